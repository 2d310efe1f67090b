//! The SDK's own runtime, and the thread each client calls its listener on.

use std::{
    sync::{mpsc, Arc, OnceLock},
    time::Duration,
};

use parking_lot::Mutex;

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

/// Calls a listener on its own thread, in order, so the runtime never
/// waits for the app. Dropping every clone ends the thread once the calls
/// queued before are made.
pub(crate) struct Dispatcher<E: Send + 'static> {
    calls: mpsc::Sender<E>,
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

impl<E: Send + 'static> Clone for Dispatcher<E> {
    fn clone(&self) -> Self {
        Self {
            calls: self.calls.clone(),
        }
    }
}

impl<E: Send + 'static> Dispatcher<E> {
    pub(crate) fn new(name: &str, mut call: impl FnMut(E) + Send + 'static) -> (Self, Finished) {
        let (calls, inbox) = mpsc::channel::<E>();
        let (done, finished) = mpsc::channel();
        let spawned = std::thread::Builder::new()
            .name(format!("hexfleet-{name}-listener"))
            .spawn(move || {
                while let Ok(event) = inbox.recv() {
                    call(event);
                }
                drop(call);
                let _ = done.send(());
            });
        if let Err(e) = spawned {
            tracing::warn!(error = %e, "no listener thread: the listener will not be called");
        }
        (Self { calls }, Finished(Mutex::new(finished)))
    }

    pub(crate) fn send(&self, event: E) {
        let _ = self.calls.send(event);
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
