//! The SDK's own runtime, and the thread each client calls its listener on.

use std::{
    collections::{HashMap, VecDeque},
    sync::{mpsc, Arc, OnceLock},
    time::Duration,
};

use parking_lot::{Condvar, Mutex};

use crate::{MobileError, TokenProvider};

/// Two threads: the SDK's work is a few packets a second per client.
pub(crate) fn runtime() -> &'static tokio::runtime::Runtime {
    static RUNTIME: OnceLock<tokio::runtime::Runtime> = OnceLock::new();
    RUNTIME.get_or_init(|| {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("hexfleet-sdk")
            .enable_all()
            .build()
            // Only fails when the OS refuses threads: nothing can run.
            .expect("the hexfleet SDK starts its runtime")
    })
}

/// What a call is about, for the queue to coalesce: a newer position of a
/// vehicle replaces one still waiting for the same vehicle.
pub(crate) trait Coalesce {
    /// The vehicle the call is about, and whether it only moves it.
    fn vehicle(&self) -> Option<(&str, bool)> {
        None
    }
}

impl Coalesce for crate::ConnectionState {}

/// The calls waiting for a listener, in order. A move waiting for its
/// listener is replaced by the vehicle's next move, so however slow the
/// app, the queue holds at most one move per vehicle besides the other
/// calls: a slow listener sees fewer, later positions, never a growing
/// backlog.
struct Queue<E> {
    calls: VecDeque<E>,
    /// The sequence number of `calls[0]`.
    first: u64,
    /// Each vehicle's move still waiting, by sequence number.
    moves: HashMap<String, u64>,
    /// Dispatchers alive; the thread ends when none is left and the queue
    /// is empty.
    senders: usize,
}

struct Shared<E> {
    queue: Mutex<Queue<E>>,
    ready: Condvar,
}

/// Calls a listener on its own thread, in order, so the runtime never
/// waits for the app. Dropping every clone ends the thread once the calls
/// queued before are made.
pub(crate) struct Dispatcher<E: Coalesce + Send + 'static> {
    shared: Arc<Shared<E>>,
}

/// Tells when a dispatcher's thread is done: its last call made and the
/// listener let go. A client closing waits for it, so that nothing of the
/// SDK calls into the app after `close` returns (a Python interpreter that
/// exits then would be entered while it shuts down).
pub(crate) struct Finished(Mutex<mpsc::Receiver<()>>);

impl Finished {
    pub(crate) fn wait(&self, at_most: Duration) {
        let _ = self.0.lock().recv_timeout(at_most);
    }
}

impl<E: Coalesce + Send + 'static> Clone for Dispatcher<E> {
    fn clone(&self) -> Self {
        self.shared.queue.lock().senders += 1;
        Self {
            shared: self.shared.clone(),
        }
    }
}

impl<E: Coalesce + Send + 'static> Drop for Dispatcher<E> {
    fn drop(&mut self) {
        self.shared.queue.lock().senders -= 1;
        self.shared.ready.notify_one();
    }
}

impl<E: Coalesce + Send + 'static> Dispatcher<E> {
    pub(crate) fn new(name: &str, mut call: impl FnMut(E) + Send + 'static) -> (Self, Finished) {
        let shared = Arc::new(Shared {
            queue: Mutex::new(Queue {
                calls: VecDeque::new(),
                first: 0,
                moves: HashMap::new(),
                senders: 1,
            }),
            ready: Condvar::new(),
        });
        let (done, finished) = mpsc::channel();
        let queue = shared.clone();
        let spawned = std::thread::Builder::new()
            .name(format!("hexfleet-{name}-listener"))
            .spawn(move || {
                while let Some(event) = queue.next() {
                    call(event);
                }
                drop(call);
                let _ = done.send(());
            });
        if let Err(e) = spawned {
            tracing::warn!(error = %e, "no listener thread: the listener will not be called");
        }
        (Self { shared }, Finished(Mutex::new(finished)))
    }

    pub(crate) fn send(&self, event: E) {
        let mut queue = self.shared.queue.lock();
        let Queue {
            calls,
            first,
            moves,
            ..
        } = &mut *queue;
        match event.vehicle() {
            Some((id, true)) => {
                if let Some(&seq) = moves.get(id) {
                    // The same vehicle's move still waits: this one, newer,
                    // takes its place.
                    calls[(seq - *first) as usize] = event;
                    return;
                }
                moves.insert(id.to_string(), *first + calls.len() as u64);
            }
            // Anything else about the vehicle comes after its waiting move.
            Some((id, false)) => {
                moves.remove(id);
            }
            None => {}
        }
        calls.push_back(event);
        drop(queue);
        self.shared.ready.notify_one();
    }
}

impl<E: Coalesce> Shared<E> {
    /// The next call, waiting for one; `None` once every dispatcher is gone
    /// and nothing is left.
    fn next(&self) -> Option<E> {
        let mut queue = self.queue.lock();
        loop {
            if let Some(call) = queue.calls.pop_front() {
                let seq = queue.first;
                queue.first += 1;
                if let Some((id, true)) = call.vehicle() {
                    if queue.moves.get(id) == Some(&seq) {
                        queue.moves.remove(id);
                    }
                }
                return Some(call);
            }
            if queue.senders == 0 {
                return None;
            }
            self.ready.wait(&mut queue);
        }
    }
}

/// Asks the app for a fresh token, off the runtime.
pub(crate) async fn fresh_token(
    provider: &Arc<Box<dyn TokenProvider>>,
    why: MobileError,
) -> Result<String, MobileError> {
    let provider = provider.clone();
    match tokio::task::spawn_blocking(move || provider.fresh_token()).await {
        Ok(Some(token)) => Ok(token),
        Ok(None) | Err(_) => Err(why),
    }
}

/// How long closing waits for the SDK to let go of the app's objects.
pub(crate) const LET_GO_WITHIN: Duration = Duration::from_secs(3);

/// The app's handle on a client's supervisor: its commands, and when the
/// SDK has let go of the app's objects.
pub(crate) struct Handle<C> {
    commands: tokio::sync::mpsc::UnboundedSender<C>,
    finished: Finished,
}

impl<C> Handle<C> {
    /// Waits for the supervisor's first connection. On failure, also for
    /// the SDK to let go of the app's objects, so a failed connect leaves
    /// nothing behind either.
    pub(crate) fn started(
        commands: tokio::sync::mpsc::UnboundedSender<C>,
        finished: Finished,
        first: mpsc::Receiver<Result<(), MobileError>>,
    ) -> Result<Self, MobileError> {
        match first.recv() {
            Ok(Ok(())) => Ok(Self { commands, finished }),
            Ok(Err(e)) => {
                finished.wait(LET_GO_WITHIN);
                Err(e)
            }
            Err(_) => Err(MobileError::Closed),
        }
    }

    pub(crate) fn send(&self, command: C) -> Result<(), MobileError> {
        self.commands.send(command).map_err(|_| MobileError::Closed)
    }

    /// Asks the supervisor to close (the command carries what it answers
    /// on once done) and waits, a few seconds at most, for it and for the
    /// listener's last call.
    pub(crate) fn close(&self, command: impl FnOnce(mpsc::Sender<()>) -> C) {
        let (done, wait) = mpsc::channel();
        if self.commands.send(command(done)).is_ok() {
            let _ = wait.recv_timeout(LET_GO_WITHIN);
            self.finished.wait(LET_GO_WITHIN);
        }
    }
}

/// When to connect again after a failed attempt: 100 ms doubling to 5 s,
/// with jitter, so a node's clients do not all come back at once.
pub(crate) struct Backoff(Duration);

impl Backoff {
    const FIRST: Duration = Duration::from_millis(100);
    const MAX: Duration = Duration::from_secs(5);

    pub(crate) fn new() -> Self {
        Self(Self::FIRST)
    }

    pub(crate) fn reset(&mut self) {
        self.0 = Self::FIRST;
    }

    /// The moment of the next attempt.
    pub(crate) fn next_at(&mut self) -> tokio::time::Instant {
        let at = tokio::time::Instant::now() + self.0.mul_f64(rand::random_range(0.5..1.5));
        self.0 = (self.0 * 2).min(Self::MAX);
        at
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, Clone, PartialEq)]
    enum Ev {
        Added(&'static str),
        Moved(&'static str, u32),
        Removed(&'static str),
    }

    impl Coalesce for Ev {
        fn vehicle(&self) -> Option<(&str, bool)> {
            match self {
                Ev::Moved(id, _) => Some((id, true)),
                Ev::Added(id) | Ev::Removed(id) => Some((id, false)),
            }
        }
    }

    type Seen = Arc<Mutex<Vec<Ev>>>;

    /// A dispatcher whose listener blocks until told to go on, recording
    /// what it is called with.
    fn held() -> (Dispatcher<Ev>, Finished, Seen, mpsc::Sender<()>) {
        let seen = Arc::new(Mutex::new(Vec::new()));
        let (go, gate) = mpsc::channel::<()>();
        let record = seen.clone();
        let (dispatcher, finished) = Dispatcher::new("test", move |e| {
            let _ = gate.recv();
            record.lock().push(e);
        });
        (dispatcher, finished, seen, go)
    }

    #[test]
    fn a_slow_listener_gets_each_vehicles_latest_move_in_order_with_the_rest() {
        let (dispatcher, finished, seen, go) = held();
        dispatcher.send(Ev::Added("a"));
        for step in 0..1_000 {
            dispatcher.send(Ev::Moved("a", step));
            dispatcher.send(Ev::Moved("b", step));
        }
        dispatcher.send(Ev::Removed("a"));
        dispatcher.send(Ev::Moved("a", 5_000));
        // The listener is still on its first call: at most that, plus one
        // move of each vehicle, plus the removal and the move after it.
        assert!(dispatcher.shared.queue.lock().calls.len() <= 5);
        drop(dispatcher);
        for _ in 0..10 {
            let _ = go.send(());
        }
        finished.wait(Duration::from_secs(5));
        let seen = seen.lock().clone();
        let a: Vec<&Ev> = seen
            .iter()
            .filter(|e| e.vehicle().is_some_and(|(id, _)| id == "a"))
            .collect();
        let last = a.len() - 1;
        assert!(matches!(a[0], Ev::Added("a")), "{seen:?}");
        assert_eq!(a[last - 1], &Ev::Removed("a"), "{seen:?}");
        assert_eq!(a[last], &Ev::Moved("a", 5_000), "{seen:?}");
        assert!(seen.contains(&Ev::Moved("a", 999)), "{seen:?}");
        assert_eq!(seen.last(), Some(&Ev::Moved("a", 5_000)));
        assert!(seen.contains(&Ev::Moved("b", 999)), "{seen:?}");
        assert!(seen.len() <= 6, "{seen:?}");
    }

    #[test]
    fn the_thread_ends_after_the_last_call_once_every_dispatcher_is_gone() {
        let (dispatcher, finished, seen, go) = held();
        let other = dispatcher.clone();
        dispatcher.send(Ev::Added("a"));
        drop(dispatcher);
        other.send(Ev::Added("b"));
        drop(other);
        let _ = go.send(());
        let _ = go.send(());
        finished.wait(Duration::from_secs(5));
        assert_eq!(*seen.lock(), vec![Ev::Added("a"), Ev::Added("b")]);
    }
}
