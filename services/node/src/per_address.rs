//! Connections counted per source IP address, so one host cannot take a
//! listener's whole connection budget. The cluster's other members are
//! exempt on the HTTP listener: a node relaying drivers to this one (see
//! `session::forward`) opens a connection per driver, thousands from one
//! address when a node its clients cannot reach has that many.

use std::{collections::HashSet, net::IpAddr, sync::Arc};

use dashmap::{mapref::entry::Entry, DashMap};

#[derive(Debug)]
pub struct PerAddress {
    max: usize,
    open: DashMap<IpAddr, usize>,
    /// Addresses counted but not limited: the cluster's other members.
    exempt: parking_lot::RwLock<HashSet<IpAddr>>,
}

/// One connection's place in its address's count; freed when dropped.
#[derive(Debug)]
pub struct AddressSlot {
    owner: Arc<PerAddress>,
    ip: IpAddr,
}

impl PerAddress {
    pub fn new(max: usize) -> Arc<Self> {
        Arc::new(Self {
            max,
            open: DashMap::new(),
            exempt: parking_lot::RwLock::default(),
        })
    }

    /// The addresses not limited from now on (those of the cluster's other
    /// members), in place of the last ones given.
    pub fn set_exempt(&self, addresses: impl IntoIterator<Item = IpAddr>) {
        *self.exempt.write() = addresses.into_iter().map(canonical).collect();
    }

    /// A slot for one more connection from `ip`, unless it has `max` open
    /// and is not exempt.
    pub fn try_acquire(self: &Arc<Self>, ip: IpAddr) -> Option<AddressSlot> {
        let ip = canonical(ip);
        let exempt = self.exempt.read().contains(&ip);
        let mut open = self.open.entry(ip).or_insert(0);
        if *open >= self.max && !exempt {
            return None;
        }
        *open += 1;
        Some(AddressSlot {
            owner: self.clone(),
            ip,
        })
    }

    /// Connections open from `ip`.
    pub fn open(&self, ip: IpAddr) -> usize {
        self.open.get(&canonical(ip)).map_or(0, |n| *n)
    }
}

/// An IPv4 peer reached over a dual-stack socket counts as itself.
fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        v4 => v4,
    }
}

impl Drop for AddressSlot {
    fn drop(&mut self) {
        if let Entry::Occupied(mut open) = self.owner.open.entry(self.ip) {
            *open.get_mut() -= 1;
            if *open.get() == 0 {
                open.remove();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_address_gets_its_share_and_slots_free_on_drop() {
        let limit = PerAddress::new(2);
        let a: IpAddr = "10.0.0.1".parse().unwrap();
        let mapped: IpAddr = "::ffff:10.0.0.1".parse().unwrap();
        let b: IpAddr = "10.0.0.2".parse().unwrap();
        let one = limit.try_acquire(a).unwrap();
        let two = limit.try_acquire(mapped).unwrap();
        assert!(limit.try_acquire(a).is_none(), "the same host, dual-stack");
        assert!(limit.try_acquire(b).is_some());
        drop(one);
        assert_eq!(limit.open(a), 1);
        let _three = limit.try_acquire(a).unwrap();
        drop(two);
        assert_eq!(limit.open(a), 1);
    }

    #[test]
    fn the_clusters_members_are_counted_but_not_limited() {
        let limit = PerAddress::new(1);
        let peer: IpAddr = "10.0.0.7".parse().unwrap();
        let client: IpAddr = "10.0.0.8".parse().unwrap();
        limit.set_exempt(["::ffff:10.0.0.7".parse().unwrap()]);
        let relays: Vec<_> = (0..5).map(|_| limit.try_acquire(peer).unwrap()).collect();
        assert_eq!(limit.open(peer), 5);
        let _one = limit.try_acquire(client).unwrap();
        assert!(limit.try_acquire(client).is_none());
        // A member that left is limited again; its open slots still free.
        limit.set_exempt([]);
        assert!(limit.try_acquire(peer).is_none());
        drop(relays);
        assert_eq!(limit.open(peer), 0);
        assert!(limit.try_acquire(peer).is_some());
    }
}
