//! One risk score per device, and the moves between `active`, `suspect` and `quarantined`.
//!
//! Invariants:
//! - Evidence is a probability that the device is compromised; pieces combine as independent
//!   ones (`1 - Π(1 - w)`) and fade with a half-life, so old noise does not add up forever.
//! - Evidence is kept in two sums: *keyed* (produced with the device's key or inside its
//!   authenticated session) and *unkeyed* (failed logins, floods of connections: anyone can
//!   produce them under a device's id). Only keyed evidence can cut a device off; unkeyed
//!   evidence alone can at most make it `suspect`, so an attacker cannot silence a patient's
//!   monitor by failing logins in its name.
//! - A third sum holds *population* evidence: a device unlike the rest of its class (the fleet
//!   model). Some patients are simply unusual, and their monitors must not be cut off for it:
//!   population evidence counts as keyed only up to `population_cap`, below
//!   `quarantine_threshold`, so a cut-off needs the device's own statistics or a rule to agree.
//! - Hysteresis: `active → suspect` at `suspect_threshold`, back to `active` only below
//!   `release_threshold`; `→ quarantined` at `quarantine_threshold` of keyed risk, and out
//!   of quarantine only by the SOC's release, which also clears the device's risk.
//! - Quarantine is decided here but carried out (and made durable) by the responder; a
//!   restart rebuilds risk from zero while the registry keeps the quarantine.

use serde::Deserialize;

/// Thresholds and memory of the risk score.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RiskConfig {
    /// Time for evidence to lose half its weight, in seconds.
    pub half_life_s: f64,
    /// Risk at which a device becomes `suspect` (an alert).
    pub suspect_threshold: f64,
    /// Risk below which a `suspect` device is `active` again.
    pub release_threshold: f64,
    /// Keyed risk at which a device is cut off (or, under `alert_and_confirm`, proposed for
    /// cut-off to the SOC).
    pub quarantine_threshold: f64,
    /// Most that unkeyed evidence adds to the risk; below `quarantine_threshold` by design.
    pub unkeyed_cap: f64,
    /// Most that population evidence (unlike the device's class) adds to the keyed risk;
    /// below `quarantine_threshold` by design.
    pub population_cap: f64,
}

impl Default for RiskConfig {
    fn default() -> Self {
        Self {
            half_life_s: 300.0,
            suspect_threshold: 0.5,
            release_threshold: 0.25,
            quarantine_threshold: 0.8,
            unkeyed_cap: 0.6,
            population_cap: 0.7,
        }
    }
}

/// A device's standing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Standing {
    Active,
    Suspect,
    /// Keyed risk crossed the quarantine threshold under `alert_and_confirm`: the SOC decides.
    AwaitingConfirmation,
    Quarantined,
}

impl Standing {
    pub fn as_str(self) -> &'static str {
        match self {
            Standing::Active => "active",
            Standing::Suspect => "suspect",
            Standing::AwaitingConfirmation => "awaiting_confirmation",
            Standing::Quarantined => "quarantined",
        }
    }
}

/// What a class's devices get when their keyed risk crosses the quarantine threshold.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Policy {
    /// Cut the device off at once.
    CutOff,
    /// Raise a critical alert and wait for the SOC (for life-critical devices).
    AlertAndConfirm,
}

/// What a piece of evidence rests on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Basis {
    /// Produced with the device's key or inside its authenticated session, and telling of a
    /// compromise on its own.
    Keyed,
    /// Keyed, but only saying that the device is unlike its class; capped.
    Population,
    /// Anyone could produce it under the device's id (failed logins, connection floods).
    Unkeyed,
}

/// The risk of one device.
#[derive(Debug, Clone)]
pub struct RiskState {
    keyed: f64,
    population: f64,
    unkeyed: f64,
    updated_at_ms: i64,
    standing: Standing,
}

impl Default for RiskState {
    fn default() -> Self {
        Self {
            keyed: 0.0,
            population: 0.0,
            unkeyed: 0.0,
            updated_at_ms: 0,
            standing: Standing::Active,
        }
    }
}

impl RiskState {
    /// A device already quarantined (by the registry) when the detector starts.
    pub fn quarantined() -> Self {
        Self {
            standing: Standing::Quarantined,
            ..Self::default()
        }
    }

    pub fn standing(&self) -> Standing {
        self.standing
    }

    /// The combined risk at `now_ms`, in [0, 1].
    pub fn risk(&self, now_ms: i64, config: &RiskConfig) -> f64 {
        let fade = self.fade(now_ms, config);
        combine(
            combine(
                self.keyed * fade,
                (self.population * fade).min(config.population_cap),
            ),
            (self.unkeyed * fade).min(config.unkeyed_cap),
        )
    }

    /// The risk that can cut the device off: keyed evidence, and population evidence up to
    /// its cap.
    fn keyed_risk(&self, config: &RiskConfig) -> f64 {
        combine(self.keyed, self.population.min(config.population_cap))
    }

    /// Adds one piece of evidence and returns the new standing if it changed.
    pub fn add(
        &mut self,
        weight: f64,
        basis: Basis,
        now_ms: i64,
        policy: Policy,
        config: &RiskConfig,
    ) -> Option<Standing> {
        self.decay_to(now_ms, config);
        let weight = weight.clamp(0.0, 1.0);
        match basis {
            Basis::Keyed => self.keyed = combine(self.keyed, weight),
            Basis::Population => self.population = combine(self.population, weight),
            Basis::Unkeyed => self.unkeyed = combine(self.unkeyed, weight),
        }
        self.reassess(now_ms, policy, config)
    }

    /// Re-evaluates the standing as evidence fades; returns it if it changed.
    pub fn reassess(
        &mut self,
        now_ms: i64,
        policy: Policy,
        config: &RiskConfig,
    ) -> Option<Standing> {
        self.decay_to(now_ms, config);
        let keyed = self.keyed_risk(config);
        let risk = combine(keyed, self.unkeyed.min(config.unkeyed_cap));
        let next = match self.standing {
            Standing::Quarantined => Standing::Quarantined,
            _ if keyed >= config.quarantine_threshold => match policy {
                Policy::CutOff => Standing::Quarantined,
                Policy::AlertAndConfirm => Standing::AwaitingConfirmation,
            },
            Standing::AwaitingConfirmation if risk >= config.release_threshold => {
                Standing::AwaitingConfirmation
            }
            Standing::Active if risk >= config.suspect_threshold => Standing::Suspect,
            Standing::Suspect | Standing::AwaitingConfirmation
                if risk < config.release_threshold =>
            {
                Standing::Active
            }
            current => current,
        };
        (next != self.standing).then(|| {
            self.standing = next;
            next
        })
    }

    /// Quarantined by an operator, or by this detector through the responder.
    pub fn set_quarantined(&mut self) {
        self.standing = Standing::Quarantined;
    }

    /// Released by the SOC: the slate is wiped.
    pub fn release(&mut self, now_ms: i64) {
        *self = Self {
            updated_at_ms: now_ms,
            ..Self::default()
        };
    }

    fn fade(&self, now_ms: i64, config: &RiskConfig) -> f64 {
        let elapsed_s = (now_ms - self.updated_at_ms).max(0) as f64 / 1000.0;
        if config.half_life_s <= 0.0 {
            return 1.0;
        }
        0.5f64.powf(elapsed_s / config.half_life_s)
    }

    fn decay_to(&mut self, now_ms: i64, config: &RiskConfig) {
        let fade = self.fade(now_ms, config);
        self.keyed *= fade;
        self.population *= fade;
        self.unkeyed *= fade;
        self.updated_at_ms = self.updated_at_ms.max(now_ms);
    }
}

/// Independent evidence combined: the chance that at least one piece is right.
fn combine(a: f64, b: f64) -> f64 {
    1.0 - (1.0 - a) * (1.0 - b)
}

#[cfg(test)]
mod tests {
    use super::*;

    const CUT_OFF: Policy = Policy::CutOff;

    #[test]
    fn one_forged_signature_cuts_a_device_off() {
        let config = RiskConfig::default();
        let mut risk = RiskState::default();
        assert_eq!(
            risk.add(0.9, Basis::Keyed, 1_000, CUT_OFF, &config),
            Some(Standing::Quarantined)
        );
    }

    #[test]
    fn unkeyed_evidence_never_cuts_off() {
        let config = RiskConfig::default();
        let mut risk = RiskState::default();
        let mut standings = Vec::new();
        for i in 0..1000 {
            if let Some(s) = risk.add(0.9, Basis::Unkeyed, 1_000 + i, CUT_OFF, &config) {
                standings.push(s);
            }
        }
        assert_eq!(standings, vec![Standing::Suspect]);
        assert!(risk.risk(2_000, &config) <= config.unkeyed_cap + 1e-9);
    }

    #[test]
    fn being_unlike_the_fleet_alone_never_cuts_off_but_adds_to_other_evidence() {
        let config = RiskConfig::default();
        let mut risk = RiskState::default();
        let mut standings = Vec::new();
        for i in 0..100 {
            if let Some(s) = risk.add(0.7, Basis::Population, 1_000 + i, CUT_OFF, &config) {
                standings.push(s);
            }
        }
        assert_eq!(standings, vec![Standing::Suspect]);
        assert_eq!(
            risk.add(0.45, Basis::Keyed, 2_000, CUT_OFF, &config),
            Some(Standing::Quarantined),
            "the device's own statistics agree"
        );
    }

    #[test]
    fn suspicion_fades_with_hysteresis() {
        let config = RiskConfig::default();
        let mut risk = RiskState::default();
        assert_eq!(
            risk.add(0.6, Basis::Keyed, 0, CUT_OFF, &config),
            Some(Standing::Suspect)
        );
        // One half-life later the risk is 0.3: above the release threshold, still suspect.
        assert_eq!(risk.reassess(300_000, CUT_OFF, &config), None);
        // Two half-lives: 0.15, below it.
        assert_eq!(
            risk.reassess(600_000, CUT_OFF, &config),
            Some(Standing::Active)
        );
    }

    #[test]
    fn life_critical_classes_wait_for_the_soc() {
        let config = RiskConfig::default();
        let mut risk = RiskState::default();
        let policy = Policy::AlertAndConfirm;
        assert_eq!(
            risk.add(0.95, Basis::Keyed, 0, policy, &config),
            Some(Standing::AwaitingConfirmation)
        );
        risk.set_quarantined();
        assert_eq!(risk.reassess(10_000_000, policy, &config), None);
        risk.release(10_000_000);
        assert_eq!(risk.standing(), Standing::Active);
    }
}
