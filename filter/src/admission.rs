//! Connection limits: at most `max` in all and `per_peer` from one peer, where a peer is an
//! IPv4 address or an IPv6 /64 (one host's usual share of addresses: counting single IPv6
//! addresses would let one host take every place).
//!
//! The filter keeps two of these: one for handshakes in progress (taken when a TCP connection
//! is accepted, so a flood of half-open upgrades is bounded, and held at most for the short
//! handshake deadline), and one for sessions (taken only once the TLS handshake and the token
//! check passed, so clients that never authenticate hold no session's place). A connection over
//! the session limits gets HTTP 503 at the upgrade; one over the handshake limits is closed at
//! once.

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
    /// Too many handshakes in progress (`FILTER_MAX_HANDSHAKES`, in all or per peer).
    Handshakes,
}

impl Refusal {
    /// The metric label value.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Full => "max_connections",
            Self::PeerFull => "max_connections_per_peer",
            Self::Handshakes => "max_handshakes",
        }
    }
}

/// The open connections, in all and per peer address.
#[derive(Debug)]
pub struct Admission {
    max: usize,
    per_peer: usize,
    /// What a refusal is called (the session limits name which one was reached).
    handshakes: bool,
    open: Mutex<(usize, HashMap<IpAddr, usize>)>,
}

/// One admitted connection; dropping it frees its place.
#[derive(Debug)]
pub struct Ticket {
    admission: Arc<Admission>,
    peer: IpAddr,
}

/// The peer an address counts for: an IPv4 address itself (also when written as IPv4-mapped
/// IPv6), an IPv6 address's /64.
pub fn peer_of(address: IpAddr) -> IpAddr {
    match address {
        IpAddr::V4(v4) => IpAddr::V4(v4),
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => IpAddr::V6(std::net::Ipv6Addr::from(
                u128::from(v6) & !u128::from(u64::MAX),
            )),
        },
    }
}

impl Admission {
    /// Session limits: `max` connections in all and `per_peer` from one peer.
    pub fn new(max: usize, per_peer: usize) -> Arc<Self> {
        Arc::new(Self {
            max,
            per_peer,
            handshakes: false,
            open: Mutex::new((0, HashMap::new())),
        })
    }

    /// Handshake limits: `max` handshakes in progress in all and `per_peer` from one peer.
    pub fn handshakes(max: usize, per_peer: usize) -> Arc<Self> {
        Arc::new(Self {
            handshakes: true,
            ..Arc::into_inner(Self::new(max, per_peer)).expect("just made")
        })
    }

    /// A place for a connection from `address`, or why there is none.
    pub fn enter(self: &Arc<Self>, address: IpAddr) -> Result<Ticket, Refusal> {
        let peer = peer_of(address);
        let mut open = self.open.lock().unwrap_or_else(|e| e.into_inner());
        let refused = |per_peer| match (self.handshakes, per_peer) {
            (true, _) => Refusal::Handshakes,
            (false, false) => Refusal::Full,
            (false, true) => Refusal::PeerFull,
        };
        if open.0 >= self.max {
            return Err(refused(false));
        }
        let from_peer = open.1.entry(peer).or_default();
        if *from_peer >= self.per_peer {
            return Err(refused(true));
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

    #[test]
    fn an_ipv6_host_counts_as_its_64_and_an_ipv4_mapped_address_as_ipv4() {
        let admission = Admission::new(100, 2);
        let in_one_64 = [
            "2001:db8:1:2::1",
            "2001:db8:1:2:ffff::9",
            "2001:db8:1:2:abcd::7",
        ];
        let tickets: Vec<_> = in_one_64[..2]
            .iter()
            .map(|a| admission.enter(a.parse().expect("ip")).expect("place"))
            .collect();
        assert_eq!(
            admission.enter(in_one_64[2].parse().expect("ip")).err(),
            Some(Refusal::PeerFull),
            "one /64 is one peer"
        );
        assert!(
            admission
                .enter("2001:db8:1:3::1".parse().expect("ip"))
                .is_ok(),
            "another /64"
        );
        let v4: IpAddr = "192.0.2.7".parse().expect("ip");
        let mapped: IpAddr = "::ffff:192.0.2.7".parse().expect("ip");
        assert_eq!(peer_of(mapped), v4);
        drop(tickets);
        let handshakes = Admission::handshakes(1, 1);
        let _held = handshakes.enter(v4).expect("place");
        assert_eq!(handshakes.enter(v4).err(), Some(Refusal::Handshakes));
    }
}
