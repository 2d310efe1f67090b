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
