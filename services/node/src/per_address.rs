//! Connections counted per source IP address, so one host cannot take a
//! listener's whole connection budget.

use std::{net::IpAddr, sync::Arc};

use dashmap::{mapref::entry::Entry, DashMap};

#[derive(Debug)]
pub struct PerAddress {
    max: usize,
    open: DashMap<IpAddr, usize>,
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
        })
    }

    /// A slot for one more connection from `ip`, unless it has `max` open.
    pub fn try_acquire(self: &Arc<Self>, ip: IpAddr) -> Option<AddressSlot> {
        let ip = canonical(ip);
        let mut open = self.open.entry(ip).or_insert(0);
        if *open >= self.max {
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
}
