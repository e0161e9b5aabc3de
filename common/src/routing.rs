//! Where a valid record goes (docs/contracts.md §3): the one owner of the routing rule. The
//! filter routes with it and `verify` checks stored records against it; nothing else restates
//! the threshold.

use crate::record::Record;

/// Records whose `value` is above this go to RabbitMQ; every other valid record to the file.
pub const BROKER_ABOVE: u8 = 90;

/// Where a valid record is stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Destination {
    /// RabbitMQ, and from there both writers.
    Broker,
    /// The filter's JSON Lines file.
    File,
}

impl Destination {
    /// Every destination, for zeroing metric series.
    pub const ALL: [Self; 2] = [Self::Broker, Self::File];

    /// The metric label value.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Broker => "broker",
            Self::File => "file",
        }
    }
}

/// The routing rule: `value > broker_above` → RabbitMQ, else the file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Routing {
    broker_above: u8,
}

impl Routing {
    /// The rule every service runs with.
    pub const DEFAULT: Self = Self {
        broker_above: BROKER_ABOVE,
    };

    /// A rule with another threshold (tests and what-if checks).
    pub const fn broker_above(threshold: u8) -> Self {
        Self {
            broker_above: threshold,
        }
    }

    /// Where a record with this `value` goes.
    pub fn destination_of(self, value: u8) -> Destination {
        if value > self.broker_above {
            Destination::Broker
        } else {
            Destination::File
        }
    }

    /// Where `record` goes.
    pub fn destination(self, record: &Record) -> Destination {
        self.destination_of(record.value)
    }
}

impl Default for Routing {
    fn default() -> Self {
        Self::DEFAULT
    }
}

impl std::fmt::Display for Routing {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "value > {} → broker, else file", self.broker_above)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_default_rule_sends_only_values_above_ninety_to_the_broker() {
        for value in 0..=100u8 {
            let expected = if value > 90 {
                Destination::Broker
            } else {
                Destination::File
            };
            assert_eq!(Routing::DEFAULT.destination_of(value), expected, "{value}");
        }
    }

    #[test]
    fn another_threshold_moves_the_boundary() {
        let rule = Routing::broker_above(50);
        assert_eq!(rule.destination_of(50), Destination::File);
        assert_eq!(rule.destination_of(51), Destination::Broker);
    }
}
