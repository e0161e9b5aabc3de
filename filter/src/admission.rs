//! Connection limits: at most `max` connections in all and `per_peer` from one IP address,
//! counted from the moment a TCP connection is accepted (so a flood of half-open upgrades is
//! bounded too). A connection over a limit gets HTTP 503 at the upgrade.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};

/// Why a connection was refused (also the metric label value).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// `FILTER_MAX_CONNECTIONS` reached.
    Full,
    /// `FILTER_MAX_CONNECTIONS_PER_PEER` reached for this address.
    PeerFull,
}

impl Refusal {
    /// The metric label value.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Full => "max_connections",
            Self::PeerFull => "max_connections_per_peer",
        }
    }
}

/// The open connections, in all and per peer address.
#[derive(Debug)]
pub struct Admission {
    max: usize,
    per_peer: usize,
    open: Mutex<(usize, HashMap<IpAddr, usize>)>,
}

/// One admitted connection; dropping it frees its place.
#[derive(Debug)]
pub struct Ticket {
    admission: Arc<Admission>,
    peer: IpAddr,
}

impl Admission {
    /// Limits of `max` connections in all and `per_peer` from one address.
    pub fn new(max: usize, per_peer: usize) -> Arc<Self> {
        Arc::new(Self {
            max,
            per_peer,
            open: Mutex::new((0, HashMap::new())),
        })
    }

    /// A place for a connection from `peer`, or why there is none.
    pub fn enter(self: &Arc<Self>, peer: IpAddr) -> Result<Ticket, Refusal> {
        let mut open = self.open.lock().unwrap_or_else(|e| e.into_inner());
        if open.0 >= self.max {
            return Err(Refusal::Full);
        }
        let from_peer = open.1.entry(peer).or_default();
        if *from_peer >= self.per_peer {
            return Err(Refusal::PeerFull);
        }
        *from_peer += 1;
        open.0 += 1;
        Ok(Ticket {
            admission: self.clone(),
            peer,
        })
    }
}

impl Drop for Ticket {
    fn drop(&mut self) {
        let mut open = self
            .admission
            .open
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        open.0 = open.0.saturating_sub(1);
        if let Some(count) = open.1.get_mut(&self.peer) {
            *count -= 1;
            if *count == 0 {
                open.1.remove(&self.peer);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn limits_hold_in_all_and_per_peer_and_places_come_back() {
        let admission = Admission::new(3, 2);
        let a: IpAddr = "10.0.0.1".parse().expect("ip");
        let b: IpAddr = "10.0.0.2".parse().expect("ip");
        let first = admission.enter(a).expect("first");
        let _second = admission.enter(a).expect("second");
        assert_eq!(admission.enter(a).err(), Some(Refusal::PeerFull));
        let _third = admission.enter(b).expect("other peer");
        assert_eq!(admission.enter(b).err(), Some(Refusal::Full));
        drop(first);
        assert!(admission.enter(a).is_ok(), "a freed place is reused");
    }
}
