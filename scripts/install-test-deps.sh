#!/usr/bin/env bash
# Installs what the tests need beyond crates: Debian's mosquitto-clients (mosquitto_pub), used
# by end-to-end tests as an independent MQTT client, openssl, which makes the TLS tests'
# certificates, curl, an independent HTTP client for the metrics page, and the mosquitto broker,
# which the load test compares vigil with. Does nothing when all are present.
set -euo pipefail

if command -v mosquitto_pub >/dev/null 2>&1 && command -v openssl >/dev/null 2>&1 \
    && command -v curl >/dev/null 2>&1 && [ -x /usr/sbin/mosquitto ]; then
    exit 0
fi
if [ "$(id -u)" -ne 0 ]; then
    SUDO=sudo
else
    SUDO=
fi
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -qq
$SUDO apt-get install -y -qq mosquitto mosquitto-clients openssl curl >/dev/null
