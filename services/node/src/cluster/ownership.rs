//! Which shards this node holds, wants and serves: the lease logic as a
//! state machine with no I/O, time passed in.
//!
//! [`Ownership`] is told what happened — the live set says a shard should
//! be ours or not, a lease was acquired, a renewal came back (renewed,
//! reclaimed, lost, or no answer), a write was fenced, the peers say this
//! node is cut from a key — and answers what to do: acquire, renew,
//! release, step down, rewrite a reclaimed shard. The async code in
//! [`super::Cluster`] asks the store and carries the answers out; the
//! property tests in `ownership/tests.rs` drive the machine against a model
//! of the store's lease scripts through lost and late replies, stalls,
//! cuts and frozen nodes, and check what must hold whatever happens:
//!
//! - every write the store accepts for a shard and epoch comes from one
//!   node;
//! - a node drops a shard's unwritten changes only when another holding
//!   was made since its own, or when it was cut from the store past its
//!   deadline (then no other node could have held it yet);
//! - a write the store fenced waits until a renewal sent after it says
//!   whose the shard is;
//! - a node serving a shard another node holds learns it within a renewal.

#[cfg(test)]
mod tests;

use std::{
    collections::{HashMap, HashSet},
    sync::Arc,
    time::{Duration, Instant},
};

use hexfleet_model::ShardId;

use super::{leases::Renewal, reach};
use crate::store::writer::Fence;

/// A lease this node holds.
#[derive(Debug, Clone)]
struct Holding {
    /// The lease's value, `<node id> <epoch>`: what the writer writes under.
    value: Arc<str>,
    /// Being given up: its drivers are redirected to the new owner, the
    /// writer still writes it until the release.
    releasing: bool,
    /// When the last renewal that found it ours was sent: the store set its
    /// expiry no earlier, so nobody can take it before this plus the TTL.
    renewed: Instant,
}

/// What a renewal's answer did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Renewed {
    /// Nothing to carry out (still ours, or an answer about a holding that
    /// has gone since).
    Kept,
    /// The store had lost the lease and nobody took it since: ours again
    /// under a new value; every vehicle of the shard is written again (the
    /// store may have lost them too).
    Reclaimed,
    /// Another holding has been made since: this node stepped down.
    SteppedDown,
}

/// The lease state of every shard this node holds, wants, or lost.
#[derive(Debug)]
pub struct Ownership {
    lease_ttl: Duration,
    renew_interval: Duration,
    holdings: HashMap<ShardId, Holding>,
    /// Shards this node should own and has no lease for yet.
    wanted: HashSet<ShardId>,
    /// Shards whose lease this node lost without giving it up (fenced, or
    /// not renewed in time): it serves no driver there until it holds the
    /// lease again, so nothing it accepted before can be written late.
    tainted: HashSet<ShardId>,
    /// Shards whose write was fenced and whose lease is not checked yet.
    suspect: HashSet<ShardId>,
    /// Shards whose write was fenced, and when that was heard: the writer
    /// holds their changes back until a renewal sent since says whether
    /// they are written (the lease is still, or again, ours) or dropped
    /// (another node's).
    doubt: HashMap<ShardId, Instant>,
}

impl Ownership {
    pub fn new(lease_ttl: Duration, renew_interval: Duration) -> Self {
        Ownership {
            lease_ttl,
            renew_interval,
            holdings: HashMap::new(),
            wanted: HashSet::new(),
            tainted: HashSet::new(),
            suspect: HashSet::new(),
            doubt: HashMap::new(),
        }
    }

    /// The shards whose lease this node holds.
    pub fn held(&self) -> HashSet<ShardId> {
        self.holdings.keys().copied().collect()
    }

    pub fn holds(&self, shard: ShardId) -> bool {
        self.holdings.contains_key(&shard)
    }

    /// The value this node holds `shard`'s lease under.
    pub fn value(&self, shard: ShardId) -> Option<Arc<str>> {
        self.holdings.get(&shard).map(|h| h.value.clone())
    }

    /// Whether this node still holds `shard` under `value` (not given up,
    /// lost or taken again since).
    pub fn holds_as(&self, shard: ShardId, value: &str) -> bool {
        self.holdings
            .get(&shard)
            .is_some_and(|h| &*h.value == value)
    }

    /// The value `shard` is held under while it is given up.
    pub fn releasing(&self, shard: ShardId) -> Option<Arc<str>> {
        self.holdings
            .get(&shard)
            .filter(|h| h.releasing)
            .map(|h| h.value.clone())
    }

    /// Whether drivers of a shard the live set gives this node may be
    /// served here: it is not being given up, and was not lost.
    pub fn serves(&self, shard: ShardId) -> bool {
        !self.holdings.get(&shard).is_some_and(|h| h.releasing) && !self.tainted.contains(&shard)
    }

    /// Which lease the writer writes `shard` under; a shard this node
    /// should own (`ours`, asked only when it is not held) and does not
    /// hold yet is wanted. The flag says whether it was newly wanted (the
    /// acquirer is woken).
    pub fn fence(&mut self, shard: ShardId, ours: impl FnOnce() -> bool) -> (Fence, bool) {
        if self.doubt.contains_key(&shard) {
            return (Fence::Awaiting, false);
        }
        if let Some(holding) = self.holdings.get(&shard) {
            return (Fence::Held(holding.value.clone()), false);
        }
        match ours() {
            true => (Fence::Awaiting, self.wanted.insert(shard)),
            false => (Fence::Foreign, false),
        }
    }

    /// The store refused a write to `shard` (heard at `now`): its lease is
    /// checked at once, and its changes wait for the answer. Says whether
    /// there is a lease to check.
    pub fn fenced(&mut self, shard: ShardId, now: Instant) -> bool {
        if !self.holdings.contains_key(&shard) {
            return false;
        }
        self.doubt.entry(shard).or_insert(now);
        self.suspect.insert(shard);
        true
    }

    /// Wants `shard` (the store has vehicles there and the live set gives
    /// it to this node), unless held already.
    pub fn want(&mut self, shard: ShardId) {
        if !self.holdings.contains_key(&shard) {
            self.wanted.insert(shard);
        }
    }

    /// The shards to acquire.
    pub fn wanted(&self) -> Vec<ShardId> {
        self.wanted.iter().copied().collect()
    }

    /// The live set changed: shards held that are no longer ours start
    /// being given up (returned, for the caller to hand over), shards
    /// wanted that are no longer ours are not, and shards lost that are
    /// ours now are wanted (until then their drivers are refused: nothing
    /// else would want them).
    pub fn rebalance(&mut self, ours: impl Fn(ShardId) -> bool) -> Vec<ShardId> {
        let mut moved = Vec::new();
        for (shard, holding) in self.holdings.iter_mut() {
            if !holding.releasing && !ours(*shard) {
                holding.releasing = true;
                moved.push(*shard);
            }
        }
        self.wanted.retain(|&s| ours(s));
        for &shard in &self.tainted {
            if ours(shard) && !self.holdings.contains_key(&shard) {
                self.wanted.insert(shard);
            }
        }
        moved
    }

    /// A lease acquired by a request sent at `sent`, once the shard is
    /// loaded: held, no longer wanted nor tainted.
    pub fn took(&mut self, shard: ShardId, value: Arc<str>, sent: Instant) {
        self.holdings.insert(
            shard,
            Holding {
                value,
                releasing: false,
                renewed: sent,
            },
        );
        self.wanted.remove(&shard);
        self.tainted.remove(&shard);
        self.doubt.remove(&shard);
        self.suspect.remove(&shard);
    }

    /// A lease acquired that is not taken after all (the live set moved it
    /// on while it loaded): no longer wanted.
    pub fn not_taken(&mut self, shard: ShardId) {
        self.wanted.remove(&shard);
    }

    /// Every lease held, to renew.
    pub fn to_renew(&self) -> Vec<(ShardId, Arc<str>)> {
        self.holdings
            .iter()
            .map(|(s, h)| (*s, h.value.clone()))
            .collect()
    }

    /// The shards whose write was fenced, to check now (each with the
    /// value held); a shard no longer held is no longer in doubt.
    pub fn take_suspects(&mut self) -> Vec<(ShardId, Arc<str>)> {
        let suspects: Vec<ShardId> = self.suspect.drain().collect();
        let mut checks = Vec::new();
        for shard in suspects {
            match self.holdings.get(&shard) {
                Some(holding) => checks.push((shard, holding.value.clone())),
                None => {
                    self.doubt.remove(&shard);
                }
            }
        }
        checks
    }

    /// A suspect's check got no answer: it is checked again.
    pub fn check_again(&mut self, shard: ShardId) {
        if self.holdings.contains_key(&shard) {
            self.suspect.insert(shard);
        }
    }

    /// What a renewal of `shard` under `value`, sent at `sent`, found. An
    /// answer about a holding given up or taken again since changes
    /// nothing; one sent since the shard's write was fenced ends the doubt.
    /// `ours`: whether the live set gives the shard to this node (a lost
    /// one is wanted again).
    pub fn renewed(
        &mut self,
        shard: ShardId,
        value: &str,
        sent: Instant,
        renewal: Renewal,
        ours: bool,
    ) -> Renewed {
        let Some(holding) = self.holdings.get_mut(&shard) else {
            return Renewed::Kept;
        };
        if &*holding.value != value {
            return Renewed::Kept;
        }
        match renewal {
            Renewal::Renewed => {
                holding.renewed = holding.renewed.max(sent);
                self.settle_doubt(shard, sent);
                Renewed::Kept
            }
            Renewal::Reclaimed(new) => {
                holding.renewed = holding.renewed.max(sent);
                holding.value = new.into();
                self.settle_doubt(shard, sent);
                Renewed::Reclaimed
            }
            Renewal::Lost => {
                self.step_down(shard, value, ours);
                Renewed::SteppedDown
            }
        }
    }

    /// A renewal sent at `sent` found the lease ours: changes held back by
    /// a fenced write heard before then may be written.
    fn settle_doubt(&mut self, shard: ShardId, sent: Instant) {
        if self.doubt.get(&shard).is_some_and(|&heard| heard <= sent) {
            self.doubt.remove(&shard);
        }
    }

    /// Held shards whose renewal is late (not renewed for
    /// [`reach::late_after`]) at `now`, with when they last were.
    pub fn late(&self, now: Instant) -> Vec<(ShardId, Instant)> {
        let late_after = reach::late_after(self.renew_interval);
        self.holdings
            .iter()
            .filter(|(_, h)| now.saturating_duration_since(h.renewed) >= late_after)
            .map(|(s, h)| (*s, h.renewed))
            .collect()
    }

    /// The last moment this node may serve what it last renewed at
    /// `renewed`: before anyone else can hold it.
    fn deadline(&self, renewed: Instant) -> Instant {
        reach::deadline(renewed, self.lease_ttl, self.renew_interval)
    }

    /// Steps down, at `now`, from the held shards whose deadline has
    /// passed and whose lease key this node is cut from while the peers
    /// are not (`peers_cut`: the peers say this node is the one cut from
    /// the shard's key; `reached`: this node reached the key itself just
    /// now). Returns the shards given up, their changes to be dropped.
    pub fn cut_from(
        &mut self,
        now: Instant,
        peers_cut: impl Fn(ShardId) -> bool,
        reached: impl Fn(ShardId) -> bool,
        ours: impl Fn(ShardId) -> bool,
    ) -> Vec<(ShardId, Arc<str>)> {
        let due: Vec<(ShardId, Arc<str>)> = self
            .holdings
            .iter()
            .filter(|(shard, h)| {
                now >= self.deadline(h.renewed) && peers_cut(**shard) && !reached(**shard)
            })
            .map(|(s, h)| (*s, h.value.clone()))
            .collect();
        for (shard, value) in &due {
            self.step_down(*shard, value, ours(*shard));
        }
        due
    }

    /// This node lost `shard` (held under `value`): it writes nothing more
    /// there and serves no driver of it until it holds it again (wanted
    /// again if `ours`). Returns whether it held it.
    pub fn step_down(&mut self, shard: ShardId, value: &str, ours: bool) -> bool {
        if !self.holds_as(shard, value) {
            // Given up or taken again since: not this holding's to lose.
            return false;
        }
        self.tainted.insert(shard);
        self.drop(shard);
        if ours {
            // Ours again once whoever holds it now lets it go.
            self.wanted.insert(shard);
        }
        true
    }

    /// Steps down from every shard held; returns them.
    pub fn step_down_all(&mut self, ours: impl Fn(ShardId) -> bool) -> Vec<ShardId> {
        let held: Vec<(ShardId, Arc<str>)> = self.to_renew();
        held.into_iter()
            .filter(|(shard, value)| self.step_down(*shard, value, ours(*shard)))
            .map(|(shard, _)| shard)
            .collect()
    }

    /// A shard given up under `value` (released, or lost while its last
    /// changes were written). Returns whether it was held so.
    pub fn released(&mut self, shard: ShardId, value: &str) -> bool {
        if !self.holds_as(shard, value) {
            return false;
        }
        self.drop(shard);
        true
    }

    /// Every holding, given up at once (the node leaves).
    pub fn drain(&mut self) -> Vec<(ShardId, Arc<str>)> {
        self.doubt.clear();
        self.suspect.clear();
        self.holdings.drain().map(|(s, h)| (s, h.value)).collect()
    }

    fn drop(&mut self, shard: ShardId) {
        self.holdings.remove(&shard);
        self.doubt.remove(&shard);
        self.suspect.remove(&shard);
    }
}
