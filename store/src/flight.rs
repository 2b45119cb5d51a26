//! Arrow Flight SQL over the store's tables, for remote analysts (ADBC, JDBC, `vigil sql`).
//!
//! Queries run read-only (see [`Store::sql`]). A statement ticket and a prepared-statement
//! handle are simply the query text: nothing is kept per client, so there is nothing to leak
//! or expire, and a ticket can be redeemed on any server over the same data. Authentication is
//! done outside: the server puts a bearer-token and role layer in front of this service.

use std::pin::Pin;

use arrow::datatypes::Schema;
use arrow::ipc::writer::IpcWriteOptions;
use arrow_flight::encode::FlightDataEncoderBuilder;
use arrow_flight::error::FlightError;
use arrow_flight::flight_service_server::{FlightService, FlightServiceServer};
use arrow_flight::sql::metadata::{SqlInfoData, SqlInfoDataBuilder};
use arrow_flight::sql::server::FlightSqlService;
use arrow_flight::sql::{
    ActionClosePreparedStatementRequest, ActionCreatePreparedStatementRequest,
    ActionCreatePreparedStatementResult, CommandGetSqlInfo, CommandPreparedStatementQuery,
    CommandStatementQuery, ProstMessageExt, SqlInfo, TicketStatementQuery,
};
use arrow_flight::{
    Action, FlightDescriptor, FlightEndpoint, FlightInfo, HandshakeRequest, HandshakeResponse,
    IpcMessage, SchemaAsIpc, Ticket,
};
use futures::{Stream, TryStreamExt};
use prost::Message;
use tonic::{Request, Response, Status, Streaming};

use crate::{Store, StoreError};

/// Flight SQL service holding a [`Store`].
#[derive(Debug, Clone)]
pub(crate) struct StoreFlightSqlService {
    store: Store,
}

/// The Flight SQL gRPC service over `store` (authentication is the caller's layer).
pub fn flight_sql_service(store: Store) -> FlightServiceServer<impl FlightService> {
    FlightServiceServer::new(StoreFlightSqlService { store })
}

type DoGetStream = <StoreFlightSqlService as FlightService>::DoGetStream;

fn status_of(error: StoreError) -> Status {
    match error {
        StoreError::DataFusion(error) => Status::invalid_argument(error.to_string()),
        other => Status::internal(other.to_string()),
    }
}

fn utf8(bytes: &[u8], what: &str) -> Result<String, Status> {
    String::from_utf8(bytes.to_vec())
        .map_err(|_| Status::invalid_argument(format!("{what} is not UTF-8")))
}

fn sql_info_data() -> Result<SqlInfoData, Status> {
    let mut builder = SqlInfoDataBuilder::new();
    builder.append(SqlInfo::FlightSqlServerName, "vigil");
    builder.append(SqlInfo::FlightSqlServerVersion, env!("CARGO_PKG_VERSION"));
    builder.append(SqlInfo::FlightSqlServerArrowVersion, "1.3");
    builder.append(SqlInfo::FlightSqlServerReadOnly, true);
    builder
        .build()
        .map_err(|e| Status::internal(format!("sql info: {e}")))
}

impl StoreFlightSqlService {
    /// Plans `query` and returns its result schema.
    async fn schema_of(&self, query: &str) -> Result<Schema, Status> {
        let frame = self.store.plan_query(query).await.map_err(status_of)?;
        Ok(frame.schema().as_arrow().clone())
    }

    fn flight_info(
        schema: &Schema,
        ticket: Ticket,
        descriptor: FlightDescriptor,
    ) -> Result<FlightInfo, Status> {
        let info = FlightInfo::new()
            .try_with_schema(schema)
            .map_err(|e| Status::internal(format!("encode schema: {e}")))?
            .with_endpoint(FlightEndpoint::new().with_ticket(ticket))
            .with_descriptor(descriptor);
        Ok(info)
    }

    /// Runs `query` and streams its batches as Flight data.
    async fn stream_query(&self, query: &str) -> Result<Response<DoGetStream>, Status> {
        let frame = self.store.plan_query(query).await.map_err(status_of)?;
        let schema = std::sync::Arc::new(frame.schema().as_arrow().clone());
        let batches = frame
            .execute_stream()
            .await
            .map_err(|e| Status::invalid_argument(e.to_string()))?
            .map_err(|e| FlightError::ExternalError(Box::new(e)));
        let stream = FlightDataEncoderBuilder::new()
            .with_schema(schema)
            .build(batches)
            .map_err(Status::from);
        Ok(Response::new(Box::pin(stream)))
    }
}

#[tonic::async_trait]
impl FlightSqlService for StoreFlightSqlService {
    type FlightService = StoreFlightSqlService;

    async fn do_handshake(
        &self,
        _request: Request<Streaming<HandshakeRequest>>,
    ) -> Result<
        Response<Pin<Box<dyn Stream<Item = Result<HandshakeResponse, Status>> + Send>>>,
        Status,
    > {
        // Authentication happened in the layer in front; answer with an empty success.
        let response = HandshakeResponse::default();
        let stream = futures::stream::once(async { Ok(response) });
        Ok(Response::new(Box::pin(stream)))
    }

    async fn get_flight_info_statement(
        &self,
        query: CommandStatementQuery,
        request: Request<FlightDescriptor>,
    ) -> Result<Response<FlightInfo>, Status> {
        let schema = self.schema_of(&query.query).await?;
        let handle = TicketStatementQuery {
            statement_handle: query.query.into_bytes().into(),
        };
        let ticket = Ticket::new(handle.as_any().encode_to_vec());
        let info = Self::flight_info(&schema, ticket, request.into_inner())?;
        Ok(Response::new(info))
    }

    async fn get_flight_info_prepared_statement(
        &self,
        query: CommandPreparedStatementQuery,
        request: Request<FlightDescriptor>,
    ) -> Result<Response<FlightInfo>, Status> {
        let text = utf8(
            &query.prepared_statement_handle,
            "prepared statement handle",
        )?;
        let schema = self.schema_of(&text).await?;
        let ticket = Ticket::new(query.as_any().encode_to_vec());
        let info = Self::flight_info(&schema, ticket, request.into_inner())?;
        Ok(Response::new(info))
    }

    async fn get_flight_info_sql_info(
        &self,
        query: CommandGetSqlInfo,
        request: Request<FlightDescriptor>,
    ) -> Result<Response<FlightInfo>, Status> {
        let data = sql_info_data()?;
        let schema = query.clone().into_builder(&data).schema();
        let ticket = Ticket::new(query.as_any().encode_to_vec());
        let info = Self::flight_info(&schema, ticket, request.into_inner())?;
        Ok(Response::new(info))
    }

    async fn do_get_statement(
        &self,
        ticket: TicketStatementQuery,
        _request: Request<Ticket>,
    ) -> Result<Response<DoGetStream>, Status> {
        let text = utf8(&ticket.statement_handle, "statement ticket")?;
        self.stream_query(&text).await
    }

    async fn do_get_prepared_statement(
        &self,
        query: CommandPreparedStatementQuery,
        _request: Request<Ticket>,
    ) -> Result<Response<DoGetStream>, Status> {
        let text = utf8(
            &query.prepared_statement_handle,
            "prepared statement handle",
        )?;
        self.stream_query(&text).await
    }

    async fn do_get_sql_info(
        &self,
        query: CommandGetSqlInfo,
        _request: Request<Ticket>,
    ) -> Result<Response<DoGetStream>, Status> {
        let data = sql_info_data()?;
        let builder = query.into_builder(&data);
        let schema = builder.schema();
        let batch = builder.build();
        let stream = FlightDataEncoderBuilder::new()
            .with_schema(schema)
            .build(futures::stream::once(async { batch }))
            .map_err(Status::from);
        Ok(Response::new(Box::pin(stream)))
    }

    async fn do_action_create_prepared_statement(
        &self,
        query: ActionCreatePreparedStatementRequest,
        _request: Request<Action>,
    ) -> Result<ActionCreatePreparedStatementResult, Status> {
        // Planning now reports a SQL error at prepare time, as clients expect.
        let schema = self.schema_of(&query.query).await?;
        let IpcMessage(dataset_schema) = SchemaAsIpc::new(&schema, &IpcWriteOptions::default())
            .try_into()
            .map_err(|e: arrow::error::ArrowError| {
                Status::internal(format!("encode schema: {e}"))
            })?;
        Ok(ActionCreatePreparedStatementResult {
            prepared_statement_handle: query.query.into_bytes().into(),
            dataset_schema,
            parameter_schema: Default::default(),
        })
    }

    async fn do_action_close_prepared_statement(
        &self,
        _query: ActionClosePreparedStatementRequest,
        _request: Request<Action>,
    ) -> Result<(), Status> {
        // The handle is the query text: nothing to release.
        Ok(())
    }

    async fn register_sql_info(&self, _id: i32, _result: &SqlInfo) {}
}
