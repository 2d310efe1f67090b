//! [`Ownership`] driven against a model of the store through faults.
//!
//! Three nodes and four shards, in simulated time (50 ms steps): each node
//! renews its leases every renewal interval, acquires what it wants and
//! asks its peers about late leases every 100 ms, and writes the shards it
//! serves, as `Cluster` does. The store is a model of the lease scripts
//! (`leases.rs`: ACQUIRE, RENEW, RELEASE) and of the write script's fence;
//! requests reach it after a random delay and answer after another, or
//! fail after the client's timeout.
//!
//! Faults, drawn at random: a node's link to the store cut (its requests
//! fail; its peers still answer it), a node frozen (it does nothing, then
//! goes on), the store stalled (requests wait, then run in the order they
//! came; leases expire meanwhile), the store restarted empty, and a node's
//! view of who should own what changed (stale, or agreed by all). After
//! the faults the views agree, and the cluster must converge.
//!
//! What must hold, whatever the schedule:
//!
//! 1. the store accepts a shard's writes from one holding at a time, and
//!    never from a holding it has left;
//! 2. a node drops a shard's unwritten changes only when the store says
//!    another holding was made since its own, or when its deadline has
//!    passed while cut from the store (and the peers say so);
//! 3. after a write is fenced, the shard is not written again until a
//!    renewal sent since says it is still (or again) this node's;
//! 4. a node holding a shard that another node holds in the store (split
//!    brain) finds out within a renewal interval and a timeout of its own
//!    running time;
//! 5. once the faults end, every shard is held, in the store and in
//!    memory, by the node that should own it, and by no other.

use std::collections::{BTreeMap, HashMap, HashSet};

use rand::{rngs::StdRng, Rng, SeedableRng};

use super::*;

const TTL: Duration = Duration::from_millis(1500);
const RENEW: Duration = Duration::from_millis(500);
const STEP: Duration = Duration::from_millis(50);
/// Acquire and guard ticks, in steps (100 ms, as `ACQUIRE_INTERVAL`).
const TICK_STEPS: u32 = 2;
/// One way, to or from the store.
const MAX_DELAY_MS: u64 = 40;
/// A request not answered within this fails (the store's timeout).
const TIMEOUT: Duration = Duration::from_millis(1000);
const NODES: usize = 3;
const SHARDS: usize = 4;
/// Faults start and end within this many steps.
const FAULT_STEPS: u32 = 300;
/// Steps run after the faults, to converge.
const CALM_STEPS: u32 = 160;

fn shards() -> Vec<ShardId> {
    [
        (52.52, 13.40),
        (48.85, 2.35),
        (40.71, -74.0),
        (-33.87, 151.21),
    ]
    .iter()
    .map(|&(lat, lon)| {
        let cell = h3o::LatLng::new(lat, lon)
            .expect("a valid point")
            .to_cell(h3o::Resolution::Five);
        ShardId(cell)
    })
    .collect()
}

use crate::cluster::leases::epoch_of;

/// The store's side: the lease scripts and the write script's fence.
#[derive(Debug)]
struct Store {
    /// Its clock's zero.
    origin: Instant,
    leases: HashMap<usize, (String, Instant)>,
    epochs: HashMap<usize, u64>,
    /// Each shard's writing holdings, in the order their writes came.
    writers: HashMap<usize, Vec<String>>,
}

impl Store {
    fn new(origin: Instant) -> Store {
        Store {
            origin,
            leases: HashMap::new(),
            epochs: HashMap::new(),
            writers: HashMap::new(),
        }
    }

    /// As `leases.rs`'s `epoch_floor`: a missing or behind epoch starts
    /// again from the store's clock in milliseconds.
    fn epoch_floor(&mut self, shard: usize, floor: u64, now: Instant) {
        let clock_ms = 1_000_000 + (now - self.origin).as_millis() as u64;
        let epoch = self.epochs.entry(shard).or_default();
        if *epoch < floor || *epoch == 0 {
            *epoch = clock_ms.max(floor);
        }
    }

    fn held(&self, shard: usize, now: Instant) -> Option<&str> {
        self.leases
            .get(&shard)
            .filter(|(_, expires)| *expires > now)
            .map(|(v, _)| v.as_str())
    }

    fn acquire(
        &mut self,
        shard: usize,
        node: &str,
        instance: usize,
        now: Instant,
    ) -> Option<String> {
        if let Some(held) = self.held(shard, now) {
            if !held.starts_with(&format!("{node} ")) {
                return None;
            }
        }
        self.epoch_floor(shard, 0, now);
        let epoch = self.epochs.entry(shard).or_default();
        *epoch += 1;
        let value = format!("{node} {epoch}/{instance:x}");
        self.leases.insert(shard, (value.clone(), now + TTL));
        Some(value)
    }

    fn renew(
        &mut self,
        shard: usize,
        node: &str,
        instance: usize,
        value: &str,
        now: Instant,
    ) -> Renewal {
        match self.held(shard, now).map(str::to_string) {
            Some(held) if held == value => {
                self.leases.insert(shard, (held, now + TTL));
                return Renewal::Renewed;
            }
            // This process's own, under a later epoch (a renewal of its
            // that timed out ran late).
            Some(held)
                if held.starts_with(&format!("{node} "))
                    && held.ends_with(&format!("/{instance:x}"))
                    && epoch_of(&held) > epoch_of(value) =>
            {
                self.leases.insert(shard, (held.clone(), now + TTL));
                return Renewal::Reclaimed(held);
            }
            Some(_) => return Renewal::Lost,
            None => {}
        }
        let ours = epoch_of(value);
        if self.epochs.get(&shard).is_some_and(|&e| e > ours) {
            return Renewal::Lost;
        }
        // Behind ours: the store restarted; values never seen before.
        self.epoch_floor(shard, ours, now);
        let epoch = self.epochs.entry(shard).or_default();
        *epoch += 1;
        let value = format!("{node} {epoch}/{instance:x}");
        self.leases.insert(shard, (value.clone(), now + TTL));
        Renewal::Reclaimed(value)
    }

    fn release(&mut self, shard: usize, value: &str, now: Instant) -> bool {
        if self.held(shard, now) != Some(value) {
            return false;
        }
        *self.epochs.entry(shard).or_default() += 1;
        self.leases.remove(&shard);
        true
    }

    /// Invariant 1 is checked here.
    fn write(&mut self, shard: usize, value: &str, now: Instant) -> bool {
        if self.held(shard, now) != Some(value) {
            return false;
        }
        let writers = self.writers.entry(shard).or_default();
        if writers.last().map(String::as_str) != Some(value) {
            assert!(
                !writers.iter().any(|w| w == value),
                "shard {shard}: a write under {value}, a holding it had left (writers {writers:?})"
            );
            writers.push(value.to_string());
        }
        true
    }

    /// Restarted empty: values are given again from epoch 1, so the
    /// writers' history starts again too.
    fn restart(&mut self) {
        self.leases.clear();
        self.epochs.clear();
        self.writers.clear();
    }
}

#[derive(Debug, Clone)]
enum Command {
    Acquire,
    Renew(Arc<str>),
    Release(Arc<str>),
    Write(Arc<str>),
}

#[derive(Debug, Clone)]
enum Answer {
    Acquired(Option<String>),
    Renewal(Renewal),
    Released,
    Written(bool),
}

/// A request on its way: it runs in the store at `runs` (if it got
/// there), and its answer reaches the node at `answers`, or fails then.
#[derive(Debug)]
struct Request {
    node: usize,
    shard: usize,
    sent: Instant,
    command: Command,
    runs: Option<Instant>,
    answers: Instant,
    answer: Option<Answer>,
    /// Timed out: the node forgot it, but it may still run.
    forgotten: bool,
}

#[derive(Debug, Clone, Copy)]
enum Fault {
    Cut { node: usize },
    Freeze { node: usize },
    Stall,
}

#[derive(Debug)]
struct Node {
    id: String,
    /// The node whose shards it owns (itself, or the one whose id a twin
    /// was started with).
    acts_for: usize,
    /// The step it starts at, and the one it stops at, if it does.
    starts: u32,
    stops: Option<u32>,
    own: Ownership,
    /// Who should own each shard, as this node sees it.
    view: Vec<usize>,
    next_renewal: Instant,
    /// Shards with changes not written yet, and whether a write is out.
    dirty: HashMap<usize, bool>,
    /// Shards being given up.
    giving: HashSet<usize>,
    /// Shards whose write was fenced, and when that was heard
    /// (invariant 3).
    fenced: HashMap<usize, Instant>,
    /// Running time during which this node has held a shard another
    /// holds in the store (invariant 4).
    overlap: HashMap<usize, Duration>,
}

struct World {
    start: Instant,
    now: Instant,
    step: u32,
    rng: StdRng,
    shards: Vec<ShardId>,
    store: Store,
    nodes: Vec<Node>,
    requests: Vec<Request>,
    /// Faults and the steps they span.
    faults: Vec<(Fault, u32, u32)>,
    restarts: Vec<u32>,
    views: Vec<(u32, Option<usize>, Vec<usize>)>,
}

impl World {
    fn new(seed: u64, script: &Script) -> World {
        let start = Instant::now();
        let first: Vec<usize> = (0..SHARDS).map(|s| s % NODES).collect();
        let nodes = (0..NODES)
            .map(|n| Node {
                id: format!("n{n}"),
                acts_for: n,
                starts: 0,
                stops: None,
                own: Ownership::new(TTL, RENEW),
                view: first.clone(),
                next_renewal: start + RENEW,
                dirty: HashMap::new(),
                giving: HashSet::new(),
                fenced: HashMap::new(),
                overlap: HashMap::new(),
            })
            .collect();
        let mut world = World {
            start,
            now: start,
            step: 0,
            rng: StdRng::seed_from_u64(seed),
            shards: shards(),
            store: Store::new(start),
            nodes,
            requests: Vec::new(),
            faults: Vec::new(),
            restarts: Vec::new(),
            views: Vec::new(),
        };
        for &(kind, node, from, len) in script.iter().take(10) {
            // Seven kinds: the twin's share is smaller, as it needs more.
            let node = node as usize % NODES;
            let from = u32::from(from) % FAULT_STEPS;
            let to = (from + 1 + u32::from(len) % 200).min(FAULT_STEPS);
            match kind % 7 {
                0 => world.faults.push((Fault::Cut { node }, from, to)),
                1 => world.faults.push((Fault::Freeze { node }, from, to)),
                2 => world.faults.push((Fault::Stall, from, to)),
                3 => world.restarts.push(from),
                4 => world.views.push((from, Some(node), assignment(len))),
                5 => world.views.push((from, None, assignment(len))),
                _ => world.twin(node, from, to),
            }
        }
        // After the faults, every view agrees.
        world
            .views
            .push((FAULT_STEPS, None, assignment(seed as u16)));
        world
    }

    /// `node` freezes from `from` to `to` (at least long enough for its
    /// membership to lapse), and a second process with its id starts
    /// meanwhile; when `node` wakes, its first membership renewal finds
    /// the id taken and it stops, stepping down from everything.
    fn twin(&mut self, node: usize, from: u32, to: u32) {
        if self
            .nodes
            .iter()
            .any(|n| n.acts_for == node && n.starts > 0)
        {
            return;
        }
        let lapsed = (TTL.as_millis() / STEP.as_millis()) as u32 + 1;
        let to = to.max(from + lapsed + 10);
        self.faults.push((Fault::Freeze { node }, from, to));
        self.nodes[node].stops = Some(to + 1);
        self.nodes.push(Node {
            id: self.nodes[node].id.clone(),
            acts_for: node,
            starts: from + lapsed,
            stops: None,
            own: Ownership::new(TTL, RENEW),
            view: Vec::new(),
            next_renewal: self.start,
            dirty: HashMap::new(),
            giving: HashSet::new(),
            fenced: HashMap::new(),
            overlap: HashMap::new(),
        });
    }

    /// Whether `node` runs this step: started, not stopped, not frozen.
    fn running(&self, node: usize) -> bool {
        let n = &self.nodes[node];
        self.step >= n.starts && n.stops.is_none_or(|s| self.step < s) && !self.frozen(node)
    }

    /// Starts and stops processes due this step.
    fn start_and_stop(&mut self) {
        for node in 0..self.nodes.len() {
            if self.nodes[node].starts == self.step && self.step > 0 {
                // It joins: shards the store holds that are its are wanted.
                let view = self.nodes[self.nodes[node].acts_for].view.clone();
                let acts_for = self.nodes[node].acts_for;
                for (shard, &owner) in view.iter().enumerate() {
                    if owner == acts_for {
                        self.nodes[node].own.want(self.shards[shard]);
                    }
                }
                self.nodes[node].view = view;
                self.nodes[node].next_renewal = self.now + RENEW;
            }
            if self.nodes[node].stops == Some(self.step) {
                for shard in self.nodes[node].own.step_down_all(|_| false) {
                    let s = self.index(shard);
                    self.stepped_down(node, s);
                }
            }
        }
    }

    fn faulty(&self, fault: impl Fn(Fault) -> bool) -> bool {
        self.faults
            .iter()
            .any(|&(f, from, to)| fault(f) && (from..to).contains(&self.step))
    }

    fn frozen(&self, node: usize) -> bool {
        self.faulty(|f| matches!(f, Fault::Freeze { node: n } if n == node))
    }

    fn cut(&self, node: usize) -> bool {
        self.faulty(|f| matches!(f, Fault::Cut { node: n } if n == node))
    }

    fn stalled(&self) -> bool {
        self.faulty(|f| matches!(f, Fault::Stall))
    }

    /// Whether the store has lost its data by now: then its leases promise
    /// nothing (a lease can be taken before it would have expired).
    fn restarted(&self) -> bool {
        self.restarts.iter().any(|&r| r <= self.step)
    }

    /// Whether, for a lease before now, `node` ran and the store kept
    /// time with it: neither was stopped nor lost its data. Only then can
    /// it step down before its lease could be taken (a node frozen past
    /// its deadline wakes up holding what others hold; a stalled store
    /// lets every lease expire at once).
    fn steady(&self, node: usize) -> bool {
        let since = self
            .step
            .saturating_sub((TTL.as_millis() / STEP.as_millis()) as u32);
        !self.restarted()
            && !self.faults.iter().any(|&(f, from, to)| {
                let recent = from <= self.step && to > since;
                let stopped = match f {
                    Fault::Stall => true,
                    Fault::Freeze { node: n } => n == node,
                    Fault::Cut { .. } => false,
                };
                recent && stopped
            })
    }

    /// Whether `node` reaches the store now.
    fn reaches(&self, node: usize) -> bool {
        !self.cut(node) && !self.stalled()
    }

    fn delay(&mut self) -> Duration {
        Duration::from_millis(self.rng.random_range(1..=MAX_DELAY_MS))
    }

    fn send(&mut self, node: usize, shard: usize, command: Command) {
        let sent = self.now;
        let runs = (!self.cut(node)).then(|| sent + self.delay());
        let answers = match runs {
            Some(runs) => runs + self.delay(),
            None => sent + TIMEOUT,
        };
        self.requests.push(Request {
            node,
            shard,
            sent,
            command,
            runs,
            answers,
            answer: None,
            forgotten: false,
        });
    }

    fn run(&mut self) {
        for step in 0..FAULT_STEPS + CALM_STEPS {
            self.step = step;
            self.now = self.start + STEP * step;
            if self.restarts.contains(&step) {
                self.store.restart();
            }
            self.start_and_stop();
            for (at, node, view) in self.views.clone() {
                if at == step {
                    for each in self.nodes.iter_mut() {
                        if node.is_none_or(|node| node == each.acts_for) {
                            each.view = view.clone();
                        }
                    }
                    for n in 0..self.nodes.len() {
                        if node.is_none_or(|node| node == self.nodes[n].acts_for) {
                            self.rebalance(n);
                        }
                    }
                }
            }
            self.run_store();
            for node in 0..self.nodes.len() {
                if self.running(node) {
                    self.node_step(node);
                }
            }
            self.check_overlap();
        }
        self.check_converged();
    }

    /// Runs what reached the store by now, in the order it came; a
    /// stalled store runs nothing (requests wait).
    fn run_store(&mut self) {
        if self.stalled() {
            return;
        }
        let now = self.now;
        let mut due: Vec<usize> = (0..self.requests.len())
            .filter(|&i| {
                let r = &self.requests[i];
                r.answer.is_none() && r.runs.is_some_and(|at| at <= now)
            })
            .collect();
        due.sort_by_key(|&i| self.requests[i].runs);
        for i in due {
            let (node, shard) = (self.requests[i].node, self.requests[i].shard);
            let id = self.nodes[node].id.clone();
            let answer = match self.requests[i].command.clone() {
                Command::Acquire => Answer::Acquired(self.store.acquire(shard, &id, node, now)),
                Command::Renew(v) => Answer::Renewal(self.store.renew(shard, &id, node, &v, now)),
                Command::Release(v) => {
                    self.store.release(shard, &v, now);
                    Answer::Released
                }
                Command::Write(v) => Answer::Written(self.store.write(shard, &v, now)),
            };
            let request = &mut self.requests[i];
            // Run late (a stall): the answer comes after it ran, or never.
            let ran = request.runs.map_or(now, |at| at.max(now));
            request.answers = request.answers.max(ran + STEP);
            request.answer = Some(answer);
        }
    }

    fn ours(&self, node: usize, shard: usize) -> bool {
        self.nodes[node].view[shard] == self.nodes[node].acts_for
    }

    fn node_step(&mut self, node: usize) {
        let now = self.now;
        // Answers that arrived; a request not answered within the
        // timeout failed (it may still run).
        let arrived: Vec<usize> = (0..self.requests.len())
            .filter(|&i| {
                let r = &self.requests[i];
                r.node == node
                    && !r.forgotten
                    && ((r.answer.is_some() && r.answers <= now) || r.sent + TIMEOUT <= now)
            })
            .collect();
        let mut done = Vec::new();
        for &i in &arrived {
            let r = &self.requests[i];
            let in_time = r.answer.is_some() && r.answers <= r.sent + TIMEOUT;
            let (shard, sent, command) = (r.shard, r.sent, r.command.clone());
            let answer = if in_time { r.answer.clone() } else { None };
            // A request that timed out is forgotten, but may still run.
            if r.answer.is_some() || r.runs.is_none() {
                done.push(i);
            } else {
                self.requests[i].forgotten = true;
            }
            self.answered(node, shard, sent, command, answer);
        }
        done.sort_unstable();
        for i in done.into_iter().rev() {
            self.requests.swap_remove(i);
        }
        let step = self.step;
        if now >= self.nodes[node].next_renewal {
            self.nodes[node].next_renewal = now + RENEW;
            for (shard, value) in self.nodes[node].own.to_renew() {
                let s = self.index(shard);
                self.send(node, s, Command::Renew(value));
            }
        }
        if step.is_multiple_of(TICK_STEPS) {
            for (shard, value) in self.nodes[node].own.take_suspects() {
                let s = self.index(shard);
                self.send(node, s, Command::Renew(value));
            }
            for shard in self.nodes[node].own.wanted() {
                let s = self.index(shard);
                let asked = self.requests.iter().any(|r| {
                    r.node == node
                        && !r.forgotten
                        && r.shard == s
                        && matches!(r.command, Command::Acquire)
                });
                if !asked {
                    self.send(node, s, Command::Acquire);
                }
            }
            self.guard(node);
        }
        self.give_up(node);
        self.write(node);
    }

    fn index(&self, shard: ShardId) -> usize {
        self.shards
            .iter()
            .position(|&s| s == shard)
            .expect("a shard of the world")
    }

    fn answered(
        &mut self,
        node: usize,
        shard: usize,
        sent: Instant,
        command: Command,
        answer: Option<Answer>,
    ) {
        let id = self.shards[shard];
        let ours = self.ours(node, shard);
        let now = self.now;
        match (command.clone(), answer) {
            // As `Cluster::took`: the live set may have moved it on.
            (Command::Acquire, Some(Answer::Acquired(Some(value)))) => match ours {
                _ if self.held_elsewhere(node, shard, &value) => {
                    panic!("node {node} acquired shard {shard} under {value}, a value another process holds")
                }
                true => {
                    self.nodes[node].own.took(id, value.into(), sent);
                    self.nodes[node].fenced.remove(&shard);
                }
                false => {
                    self.nodes[node].own.not_taken(id);
                    self.send(node, shard, Command::Release(value.into()));
                }
            },
            (Command::Renew(value), Some(Answer::Renewal(renewal))) => {
                if let Renewal::Reclaimed(new) = &renewal {
                    assert!(
                        !self.held_elsewhere(node, shard, new),
                        "node {node} reclaimed shard {shard} under {new}, a value another process holds"
                    );
                }
                let lost = renewal == Renewal::Lost;
                let held = self.nodes[node].own.holds_as(id, &value);
                let did = self.nodes[node]
                    .own
                    .renewed(id, &value, sent, renewal, ours);
                if held
                    && self.nodes[node]
                        .fenced
                        .get(&shard)
                        .is_some_and(|&f| f <= sent)
                {
                    self.nodes[node].fenced.remove(&shard);
                }
                if did == Renewed::SteppedDown {
                    // Invariant 2: only when another holding was made.
                    assert!(lost);
                    let store_epoch = self.store.epochs.get(&shard).copied().unwrap_or(0);
                    assert!(
                        self.store.held(shard, now) != Some(&*value)
                            && (store_epoch > epoch_of(&value) || self.restarted()),
                        "node {node} dropped shard {shard} under {value} while it was still its own (step {}, sent {:?} ago, store {:?}, epoch {store_epoch})",
                        self.step,
                        now - sent,
                        self.store.held(shard, now)
                    );
                    self.stepped_down(node, shard);
                }
            }
            (Command::Release(value), _) => {
                if self.nodes[node].own.released(id, &value) {
                    self.nodes[node].giving.remove(&shard);
                }
            }
            (Command::Write(value), Some(Answer::Written(written))) => match written {
                true => {
                    self.nodes[node].dirty.remove(&shard);
                }
                false => {
                    if let Some(out) = self.nodes[node].dirty.get_mut(&shard) {
                        *out = false;
                    }
                    if self.nodes[node].own.fenced(id, now)
                        && self.nodes[node].own.holds_as(id, &value)
                    {
                        self.nodes[node].fenced.entry(shard).or_insert(now);
                    }
                }
            },
            (Command::Write(_), _) => {
                if let Some(out) = self.nodes[node].dirty.get_mut(&shard) {
                    *out = false;
                }
            }
            // No answer: renewals and acquisitions are tried again as ever.
            _ => {
                if let Command::Renew(_) = command {
                    self.nodes[node].own.check_again(id);
                }
            }
        }
    }

    /// Whether a process other than `node` holds `shard` under `value`:
    /// values are never given twice, even to two processes of one id.
    fn held_elsewhere(&self, node: usize, shard: usize, value: &str) -> bool {
        let id = self.shards[shard];
        (0..self.nodes.len()).any(|p| p != node && self.nodes[p].own.holds_as(id, value))
    }

    fn stepped_down(&mut self, node: usize, shard: usize) {
        let n = &mut self.nodes[node];
        n.dirty.remove(&shard);
        n.giving.remove(&shard);
        n.fenced.remove(&shard);
    }

    fn rebalance(&mut self, node: usize) {
        let view = self.nodes[node].view.clone();
        let shards = self.shards.clone();
        let index = |shard: ShardId| shards.iter().position(|&s| s == shard).unwrap_or(0);
        let me = self.nodes[node].acts_for;
        let moved = self.nodes[node]
            .own
            .rebalance(|shard| view[index(shard)] == me);
        for shard in moved {
            self.nodes[node].giving.insert(index(shard));
        }
    }

    /// The guard: late leases past their deadline, the peers asked.
    fn guard(&mut self, node: usize) {
        let now = self.now;
        if self.nodes[node].own.late(now).is_empty() {
            return;
        }
        let peers: Vec<usize> = (0..self.nodes.len())
            .filter(|&p| p != node && self.running(p))
            .collect();
        let peers_reach = peers.iter().any(|&p| self.reaches(p));
        let reached = self.reaches(node);
        let view = self.nodes[node].view.clone();
        let shards = self.shards.clone();
        let index = |shard: ShardId| shards.iter().position(|&s| s == shard).unwrap_or(0);
        let late: HashMap<ShardId, Instant> = self.nodes[node].own.late(now).into_iter().collect();
        let me = self.nodes[node].acts_for;
        let cut = self.nodes[node].own.cut_from(
            now,
            |_| peers.is_empty() || peers_reach,
            |_| reached,
            |shard| view[index(shard)] == me,
        );
        for (shard, value) in cut {
            let s = index(shard);
            // Invariant 2: past the deadline, cut while the peers are not.
            assert!(
                !reached,
                "node {node} stepped down from shard {s} while it reached the store"
            );
            assert!(
                late.get(&shard)
                    .is_some_and(|&at| now >= at + TTL - RENEW / 2),
                "node {node} stepped down from shard {s} before its deadline"
            );
            let id = &self.nodes[node].id;
            assert!(
                !self.steady(node)
                    || self
                        .store
                        .held(s, now)
                        .is_none_or(|held| held.starts_with(&format!("{id} "))),
                "node {node} stepped down from shard {s} under {value} after another took it: {:?}",
                self.store.held(s, now)
            );
            self.stepped_down(node, s);
        }
    }

    /// Shards being given up: released, under the value they are held
    /// under then, once their changes are written (as `Cluster::give_up`).
    fn give_up(&mut self, node: usize) {
        let giving: Vec<usize> = self.nodes[node].giving.iter().copied().collect();
        for shard in giving {
            let id = self.shards[shard];
            let Some(value) = self.nodes[node].own.releasing(id) else {
                self.nodes[node].giving.remove(&shard);
                continue;
            };
            let releasing = self.requests.iter().any(|r| {
                r.node == node
                    && !r.forgotten
                    && r.shard == shard
                    && matches!(r.command, Command::Release(_))
            });
            if !self.nodes[node].dirty.contains_key(&shard) && !releasing {
                self.send(node, shard, Command::Release(value));
            }
        }
    }

    /// Drivers of the shards it serves send changes; the writer writes
    /// each shard under the lease the machine names.
    fn write(&mut self, node: usize) {
        for shard in 0..SHARDS {
            let id = self.shards[shard];
            let ours = self.ours(node, shard);
            if ours && self.nodes[node].own.serves(id) {
                self.nodes[node].dirty.entry(shard).or_insert(false);
            }
            let Some(&out) = self.nodes[node].dirty.get(&shard) else {
                continue;
            };
            if out {
                continue;
            }
            let (fence, _) = self.nodes[node].own.fence(id, || ours);
            match fence {
                Fence::Held(value) => {
                    // Invariant 3.
                    assert!(
                        !self.nodes[node].fenced.contains_key(&shard),
                        "node {node} wrote shard {shard} again before a renewal said it was its own"
                    );
                    self.nodes[node].dirty.insert(shard, true);
                    self.send(node, shard, Command::Write(value));
                }
                Fence::Awaiting | Fence::Unfenced => {}
                Fence::Foreign => {
                    self.nodes[node].dirty.remove(&shard);
                }
            }
        }
    }

    /// Invariant 4: the running time a node holds a shard another node
    /// holds in the store.
    fn check_overlap(&mut self) {
        let now = self.now;
        for node in 0..self.nodes.len() {
            if !self.running(node) {
                continue;
            }
            for shard in 0..SHARDS {
                let id = self.shards[shard];
                let mine = self.nodes[node].own.value(id);
                // Another node's, or a twin's: not a value this process
                // made (its own id's, left by an acquisition that timed
                // out, is only in the store).
                let own_id = format!("{} ", self.nodes[node].id);
                let other = self.store.held(shard, now).is_some_and(|held| {
                    mine.as_deref() != Some(held)
                        && (!held.starts_with(&own_id)
                            || (0..self.nodes.len())
                                .any(|p| p != node && self.nodes[p].own.holds_as(id, held)))
                });
                // Counted while it could find out: it reaches the store, or
                // a peer does (then its deadline must have stopped it), as
                // long as neither it nor the store stopped nor the store
                // lost its data (promises the leases cannot keep).
                let peers_reach =
                    (0..self.nodes.len()).any(|p| p != node && self.running(p) && self.reaches(p));
                let could_know = self.reaches(node) || (peers_reach && self.steady(node));
                let n = &mut self.nodes[node];
                match mine.is_some() && other {
                    true => {
                        let overlap = n.overlap.entry(shard).or_default();
                        if could_know {
                            *overlap += STEP;
                        }
                        assert!(
                            *overlap <= RENEW + TIMEOUT + STEP * TICK_STEPS,
                            "node {node} held shard {shard} for {overlap:?} of its time while {:?} held it in the store",
                            self.store.held(shard, now)
                        );
                    }
                    false => {
                        n.overlap.remove(&shard);
                    }
                }
            }
        }
    }

    /// Invariant 5.
    fn check_converged(&self) {
        let now = self.now;
        for shard in 0..SHARDS {
            let id = self.shards[shard];
            let acts_for = self.nodes[0].view[shard];
            // The process acting for that node now (a twin, if one took over).
            let owner = (0..self.nodes.len())
                .rev()
                .find(|&n| self.nodes[n].acts_for == acts_for && self.nodes[n].stops.is_none())
                .unwrap_or(acts_for);
            let held = self.store.held(shard, now);
            let value = self.nodes[owner].own.value(id);
            assert!(
                value.is_some() && held == value.as_deref(),
                "shard {shard}: its owner n{owner} holds {value:?}, the store {held:?}\n{:#?}\n{:#?}",
                self.nodes,
                self.requests
            );
            assert!(
                self.nodes[owner].own.serves(id),
                "shard {shard}: n{owner} does not serve it"
            );
            for (n, node) in self.nodes.iter().enumerate() {
                if n != owner {
                    assert!(!node.own.holds(id), "shard {shard}: n{n} holds it too");
                }
            }
        }
    }
}

/// Who owns each shard, from a number.
fn assignment(seed: u16) -> Vec<usize> {
    (0..SHARDS)
        .map(|s| (usize::from(seed) >> (2 * s)) % NODES)
        .collect()
}

fn simulate(seed: u64, script: &Script) -> World {
    let mut world = World::new(seed, script);
    world.run();
    world
}

#[test]
fn leases_hold_their_promises_through_any_schedule_of_faults() {
    bolero::check!()
        .with_type::<(u64, Vec<(u8, u8, u16, u16)>)>()
        .with_iterations(400)
        .for_each(|(seed, script)| {
            simulate(*seed, script);
        });
}

#[test]
fn with_no_fault_every_shard_is_held_by_its_owner() {
    let world = simulate(7, &[]);
    let held: BTreeMap<usize, usize> = (0..SHARDS)
        .filter_map(|s| {
            let id = world.shards[s];
            (0..NODES)
                .find(|&n| world.nodes[n].own.holds(id))
                .map(|n| (s, n))
        })
        .collect();
    assert_eq!(held.len(), SHARDS);
}

#[test]
fn a_store_stalled_past_the_lease_leaves_every_shard_where_it_was() {
    // The store stalls for 4 s (past the 1.5 s lease) from 2 s, while the
    // nodes write: each shard is written by the node that held it before.
    let mut world = World::new(1, &[]);
    world.faults.push((Fault::Stall, 40, 120));
    world.views.clear();
    world.run();
    for (shard, writers) in &world.store.writers {
        let nodes: HashSet<&str> = writers.iter().filter_map(|v| v.split(' ').next()).collect();
        assert_eq!(nodes.len(), 1, "shard {shard}: {writers:?}");
    }
}

#[test]
fn a_node_cut_from_the_store_lets_go_before_another_can_take_over() {
    // n0 is cut from the store for 5 s from 2 s. Its peers see it silent a
    // lease later and give its shards to n1; n0's own view stays (it
    // cannot read the live set). The overlap check (invariant 4) allows
    // it no time holding what n1 holds.
    let mut world = World::new(3, &[]);
    world.faults.push((Fault::Cut { node: 0 }, 40, 140));
    let moved = vec![1, 1, 2, 1];
    world.views = vec![(70, Some(1), moved.clone()), (70, Some(2), moved.clone())];
    world.views.push((FAULT_STEPS, None, moved));
    world.run();
    let writers = &world.store.writers;
    assert!(
        writers[&0].iter().any(|v| v.starts_with("n1 ")),
        "{writers:?}"
    );
    assert!(world.nodes[0].overlap.is_empty());
}

#[test]
fn a_twin_started_while_a_node_is_frozen_takes_its_shards_and_the_node_stops_when_it_wakes() {
    // n0 freezes at 2 s for 4 s; a process with its id starts once its
    // membership has lapsed and takes its shards (the same id may take its
    // own lease: a restarted node does). n0 wakes holding them, writes
    // nothing (fenced), finds out, and stops.
    let mut world = World::new(5, &[]);
    world.twin(0, 40, 120);
    world.views.clear();
    world.run();
    let twin = world.nodes.len() - 1;
    assert_eq!(world.nodes[twin].acts_for, 0);
    for (shard, &owner) in world.nodes[1].view.iter().enumerate() {
        let id = world.shards[shard];
        if owner == 0 {
            assert!(world.nodes[twin].own.holds(id), "shard {shard}");
            assert!(!world.nodes[0].own.holds(id), "shard {shard}");
        }
    }
}

/// Schedules the property test failed on once, kept: each a seed and a
/// script, with what it found.
/// Faults, each drawn from four numbers (see [`World::new`]).
type Script = [(u8, u8, u16, u16)];

const FOUND: &[(&str, u64, &Script)] = &[
    (
        // Redis restarted empty while a node was frozen and a twin with its
        // id ran; the twin was given the very value the frozen node held
        // (epochs started again from 1), so the frozen node would have
        // passed the fence on waking. Epochs now start from the store's
        // clock.
        "a twin given its frozen namesake's lease value",
        11950983421629878545,
        &[
            (187, 245, 18842, 16116),
            (13, 105, 19905, 42976),
            (37, 27, 58223, 12081),
            (90, 209, 2204, 18766),
            (17, 85, 40635, 0),
        ],
    ),
    (
        // Redis restarted empty while two nodes' views both gave them shard
        // 3; n1 took it at once while n0, cut and then stalled with
        // everyone, could not hear of it until the store answered again
        // (the check counted that time against it).
        "a node cut then stalled after a restart",
        8157406496691823323,
        &[
            (228, 31, 30946, 54038),
            (177, 60, 20588, 49864),
            (202, 188, 44233, 17663),
            (234, 125, 44086, 8011),
            (92, 239, 53867, 696),
            (248, 52, 8573, 32461),
            (175, 242, 8528, 32939),
            (77, 1, 23493, 62469),
            (164, 14, 64807, 14868),
            (231, 165, 14871, 31),
        ],
    ),
];

#[test]
fn schedules_that_once_failed_hold() {
    for (what, seed, script) in FOUND {
        eprintln!("{what}");
        simulate(*seed, script);
    }
}
