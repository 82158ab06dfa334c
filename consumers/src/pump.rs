//! The loop both consumer front ends ([`serve`](crate::serve()) and the
//! [`Router`](crate::router::Router)) share: take a delivery whenever a
//! permit is free, run it in its own task, and on shutdown stop taking,
//! let running tasks finish and settle, then leave the group gracefully.

use std::future::Future;
use std::sync::Arc;

use futures::StreamExt;
use keel_core::{Deliveries, Delivery, Error, Result, Undecodable};
use tokio::sync::Semaphore;
use tokio::task::JoinSet;

/// What a member's stream yields that work must be done for.
// Events, the common case, move into their task without an allocation.
#[allow(clippy::large_enum_variant)]
pub(crate) enum Item {
    /// A Keel event.
    Event(Delivery),
    /// A record that is not a Keel event; it holds its place in the
    /// partition until settled.
    Undecodable(Box<Undecodable>),
}

/// Runs `work` on every item of `deliveries`, at most `permits` at once
/// (shared between pumps to bound a whole process), until `shutdown`
/// resolves or the stream ends; then drains and leaves.
///
/// Retriable stream errors are logged and consumption goes on; a fatal one
/// ends the pump (after draining) with that error.
pub(crate) async fn pump<F, Fut>(
    mut deliveries: Deliveries,
    permits: Arc<Semaphore>,
    shutdown: impl Future<Output = ()>,
    mut work: F,
) -> Result<()>
where
    F: FnMut(Item) -> Fut,
    Fut: Future<Output = ()> + Send + 'static,
{
    let mut tasks = JoinSet::new();
    tokio::pin!(shutdown);
    let outcome = loop {
        while let Some(finished) = tasks.try_join_next() {
            report_panic(finished);
        }
        // The delivery first, then a permit: a quiet topic waiting for its
        // next event holds no permit the busy ones could use.
        let next = tokio::select! {
            biased;
            () = &mut shutdown => break Ok(()),
            next = deliveries.next() => next,
        };
        let permit = tokio::select! {
            biased;
            () = &mut shutdown => break Ok(()),
            permit = permits.clone().acquire_owned() => match permit {
                Ok(permit) => permit,
                Err(_) => break Err(Error::closed("handler pool")),
            },
        };
        let item = match next {
            None => break Ok(()),
            Some(Ok(delivery)) => Item::Event(delivery),
            Some(Err(Error::Undecodable(record))) => Item::Undecodable(record),
            Some(Err(e)) if e.is_retriable() => {
                tracing::warn!(error = %e, "subscription hiccup; consuming on");
                continue;
            }
            Some(Err(e)) => break Err(e),
        };
        let task = work(item);
        // Boxed: the task then holds a pointer, not the whole future. A
        // router's chain future is kilobytes, and tokio moves a task's
        // future (or its stage) by value several times over its life: at
        // spawn, into its cell, and at every stage change (~3k and ~5k
        // instructions of copying per event for serve() and the router,
        // by callgrind, against one copy into the box and its allocation;
        // tokio boxes a future itself only above 16 KiB in release builds).
        tasks.spawn(Box::pin(async move {
            let _permit = permit;
            task.await;
        }));
    };
    while let Some(finished) = tasks.join_next().await {
        report_panic(finished);
    }
    let left = deliveries.leave().await;
    outcome?;
    left
}

fn report_panic(finished: std::result::Result<(), tokio::task::JoinError>) {
    if let Err(e) = finished
        && e.is_panic()
    {
        tracing::error!(
            "a handler task panicked outside the handler; its event will be re-delivered"
        );
    }
}

/// A panicking handler is a failed attempt like any other: it is retried
/// with backoff, not in a tight loop. This names the panic for the log.
pub(crate) fn panic_message(panic: &(dyn std::any::Any + Send)) -> String {
    let text = panic
        .downcast_ref::<&str>()
        .map(|s| (*s).to_owned())
        .or_else(|| panic.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "unknown panic".to_owned());
    format!("handler panicked: {text}")
}
