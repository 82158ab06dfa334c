//! The loop both consumer front ends ([`serve`](crate::serve()) and the
//! [`Router`](crate::router::Router)) share: take a delivery whenever a
//! permit is free, run it in its own task, and on shutdown stop taking,
//! let running tasks finish and settle (for at most the transport's drain
//! timeout: handlers still running then are dropped, their events left
//! uncommitted for the next owner), then leave the group gracefully. A
//! transport whose commit would otherwise hand on events already handled
//! (Kafka: one offset per partition, below events of other keys settled
//! out of order) first delivers the events below them, which run as usual
//! ([`Deliveries::start_leaving`]), within the same drain timeout.
//! Handlers still running for a partition the member no longer owns (lost,
//! or handed over after its drain timeout), or owns under a later
//! assignment (lost and taken again, or re-opened by the transport), are
//! stopped: the partition's owner runs their events again.

use std::collections::{BTreeMap, HashMap};
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use keel_core::delivery::Ownership;
use keel_core::{Deliveries, Delivery, Error, Result, Undecodable};
use tokio::sync::{Semaphore, TryAcquireError};
use tokio::task::{AbortHandle, Id, JoinSet};
use tokio::time::Sleep;
use tokio_stream::wrappers::WatchStream;

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

impl Item {
    fn is_owned(&self) -> bool {
        match self {
            Item::Event(delivery) => delivery.is_owned(),
            Item::Undecodable(record) => record.is_owned(),
        }
    }

    fn begin(&self) -> bool {
        match self {
            Item::Event(delivery) => delivery.begin(),
            Item::Undecodable(record) => record.begin(),
        }
    }

    fn partition(&self) -> u32 {
        match self {
            Item::Event(delivery) => delivery.info().coordinates.partition,
            Item::Undecodable(record) => record.info().coordinates.partition,
        }
    }

    fn ownership(&self) -> Ownership {
        match self {
            Item::Event(delivery) => delivery.ownership(),
            Item::Undecodable(record) => record.ownership(),
        }
    }
}

/// A handler task running.
struct Handling {
    partition: u32,
    ownership: Ownership,
    task: AbortHandle,
    /// [`stop_unowned`] aborted it.
    aborted: bool,
}

/// The handler tasks running, by task.
type Running = HashMap<Id, Handling>;

/// Stops the handler tasks of partitions not in `owned`, and those whose
/// delivery's assignment no longer stands: a partition lost and taken
/// again between two reads of the assignment is listed in `owned` as
/// before, and a transport re-opens a partition (reading it again from
/// its last acknowledged position) without changing the list.
fn stop_unowned(owned: &[u32], running: &mut Running) {
    let mut aborted = 0usize;
    // Every entry stays until its task is joined ([`Stopped::finished`]
    // tells a stopped one by it).
    for handling in running.values_mut() {
        // A delivery settled is not current either, but its task ends
        // without another await (`serve` and the router settle last):
        // stopping it changes nothing. One that ends before the abort
        // takes effect is not reported as stopped (see [`Stopped`]).
        if handling.aborted || handling.task.is_finished() {
            continue; // joined in the pump's next turn
        }
        let kept = owned.contains(&handling.partition) && handling.ownership.is_current();
        if !kept {
            handling.task.abort();
            handling.aborted = true;
            aborted += 1;
        }
    }
    if aborted > 0 {
        tracing::debug!(
            aborted,
            ?owned,
            "stopping handlers of partitions no longer owned"
        );
    }
}

/// Handler tasks that [`stop_unowned`] actually stopped (joined as
/// cancelled), by partition, until reported. A task that had settled its
/// delivery and was only ending when the abort came completes instead, and
/// is not counted: its event is not delivered again.
#[derive(Default)]
struct Stopped(BTreeMap<u32, usize>);

impl Stopped {
    /// Forgets a finished task; counts it if it was stopped, and reports a
    /// panic outside the handler.
    fn finished(
        &mut self,
        running: &mut Running,
        result: std::result::Result<(Id, ()), tokio::task::JoinError>,
    ) {
        let id = match &result {
            Ok((id, ())) => *id,
            Err(e) => e.id(),
        };
        let handling = running.remove(&id);
        if let (Err(e), Some(handling)) = (&result, handling)
            && e.is_cancelled()
            && handling.aborted
        {
            *self.0.entry(handling.partition).or_default() += 1;
        }
        report_panic(result.map(|_| ()));
    }

    /// Says what was stopped since the last report, once.
    fn report(&mut self) {
        if self.0.is_empty() {
            return;
        }
        let stopped: usize = self.0.values().sum();
        let partitions: Vec<u32> = self.0.keys().copied().collect();
        tracing::warn!(
            stopped,
            ?partitions,
            "stopped handlers of partitions this member no longer owns, or owns under a later assignment; their events are delivered again"
        );
        self.0.clear();
    }
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
    // Read ahead of the handlers: each delivery is begun when its handler
    // starts, so a revocation does not wait for the ones queued here.
    deliveries.begin_on_read(false);
    let mut tasks = JoinSet::new();
    let mut running = Running::new();
    let mut stopped = Stopped::default();
    // A stream, not `changed()` in each turn's select: its wait stays
    // registered between turns instead of being set up and torn down for
    // every event.
    let mut assignment = WatchStream::from_changes(deliveries.assignment_changes());
    tokio::pin!(shutdown);
    // Once shut down, if the transport still delivers what it must settle
    // before its commit ([`Deliveries::start_leaving`]): until when at most.
    let mut last_call: Option<Pin<Box<Sleep>>> = None;
    let outcome = 'pump: loop {
        while let Some(result) = tasks.try_join_next_with_id() {
            stopped.finished(&mut running, result);
        }
        stopped.report();
        if last_call.is_some() && deliveries.ready_to_leave() {
            break Ok(());
        }
        // The delivery first, then a permit: a quiet topic waiting for its
        // next event holds no permit the busy ones could use.
        let next = tokio::select! {
            biased;
            () = &mut shutdown, if last_call.is_none() => {
                last_call = start_leaving(&deliveries);
                if last_call.is_some() {
                    continue;
                }
                break Ok(());
            }
            () = deadline(&mut last_call), if last_call.is_some() => break Ok(()),
            // While leaving, a handler's settlement may be the last one
            // needed: look again when one ends.
            Some(result) = tasks.join_next_with_id(), if last_call.is_some() => {
                stopped.finished(&mut running, result);
                continue;
            }
            Some(owned) = assignment.next() => {
                stop_unowned(&owned, &mut running);
                continue;
            }
            next = deliveries.next() => next,
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
        // A partition revoked, given up or lost has a new owner that
        // delivers the event again: running it here would duplicate that
        // work, possibly alongside it and out of its key's order. Dropped,
        // it is nacked (ignored). Checked before a permit wait (which can
        // be long), and when the handler starts: `begin` also tells the
        // transport that a revocation must wait for this one, while the
        // deliveries still queued here are abandoned at once.
        let permit = match permits.clone().try_acquire_owned() {
            Ok(permit) => permit,
            Err(TryAcquireError::Closed) => break Err(Error::closed("handler pool")),
            Err(TryAcquireError::NoPermits) => {
                if !item.is_owned() {
                    continue;
                }
                loop {
                    tokio::select! {
                        biased;
                        () = &mut shutdown, if last_call.is_none() => {
                            last_call = start_leaving(&deliveries);
                            if last_call.is_none() || deliveries.ready_to_leave() {
                                break 'pump Ok(());
                            }
                            if !item.is_owned() {
                                continue 'pump;
                            }
                        }
                        () = deadline(&mut last_call), if last_call.is_some() => break 'pump Ok(()),
                        // Leaving, and the permits held by other pumps (the
                        // pool is shared): this pump's own handler ending may
                        // be the last settlement the leave waits for.
                        Some(result) = tasks.join_next_with_id(), if last_call.is_some() => {
                            stopped.finished(&mut running, result);
                            if deliveries.ready_to_leave() {
                                break 'pump Ok(());
                            }
                        }
                        // Handlers stuck on a partition no longer owned
                        // may be what holds the permits.
                        Some(owned) = assignment.next() => {
                            stop_unowned(&owned, &mut running);
                            if !item.is_owned() {
                                continue 'pump;
                            }
                        }
                        permit = permits.clone().acquire_owned() => match permit {
                            Ok(permit) => break permit,
                            Err(_) => break 'pump Err(Error::closed("handler pool")),
                        },
                    }
                }
            }
        };
        if !item.begin() {
            continue;
        }
        let (partition, ownership) = (item.partition(), item.ownership());
        let task = work(item);
        // Boxed: the task then holds a pointer, not the whole future. A
        // router's chain future is kilobytes, and tokio moves a task's
        // future (or its stage) by value several times over its life: at
        // spawn, into its cell, and at every stage change (~3k and ~5k
        // instructions of copying per event for serve() and the router,
        // by callgrind, against one copy into the box and its allocation;
        // tokio boxes a future itself only above 16 KiB in release builds).
        let handle = tasks.spawn(Box::pin(async move {
            let _permit = permit;
            task.await;
        }));
        running.insert(
            handle.id(),
            Handling {
                partition,
                ownership,
                task: handle,
                aborted: false,
            },
        );
    };
    // Nothing more is taken: a revocation from now on waits only for the
    // handlers running.
    deliveries.stop_taking();
    let ending = async {
        while let Some(result) = tasks.join_next_with_id().await {
            stopped.finished(&mut running, result);
        }
    };
    match deliveries.drain_timeout() {
        None => ending.await,
        Some(limit) => {
            // A leave that first ran what the transport still delivered
            // keeps to one drain timeout in all.
            let limit = match &last_call {
                Some(last_call) => last_call
                    .deadline()
                    .saturating_duration_since(tokio::time::Instant::now()),
                None => limit,
            };
            if tokio::time::timeout(limit, ending).await.is_err() {
                // Handlers stuck past the transport's drain timeout would
                // hold the leave (and the process) for ever: dropped, their
                // events are nacked and go to the next owner uncommitted,
                // as the leave itself would abandon them.
                tracing::warn!(
                    running = tasks.len(),
                    ?limit,
                    "handlers still running after the drain timeout; abandoning them (their events will be re-delivered)"
                );
                tasks.shutdown().await;
            }
        }
    }
    stopped.report();
    let left = deliveries.leave().await;
    outcome?;
    left
}

/// Asks the transport to deliver what it must settle before leaving (see
/// [`Deliveries::start_leaving`]); if it does, the pump goes on taking
/// deliveries until the returned deadline, the drain timeout from now.
fn start_leaving(deliveries: &Deliveries) -> Option<Pin<Box<Sleep>>> {
    deliveries.start_leaving().then(|| {
        let limit = deliveries.drain_timeout().unwrap_or(Duration::ZERO);
        Box::pin(tokio::time::sleep(limit))
    })
}

/// Resolves at `last_call` (never when there is none).
async fn deadline(last_call: &mut Option<Pin<Box<Sleep>>>) {
    match last_call {
        Some(last_call) => last_call.as_mut().await,
        None => std::future::pending().await,
    }
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
    format!("handler panicked: {}", panic_text(panic))
}

/// A panic's message, where it carries one.
pub(crate) fn panic_text(panic: &(dyn std::any::Any + Send)) -> String {
    panic
        .downcast_ref::<&str>()
        .map(|s| (*s).to_owned())
        .or_else(|| panic.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "unknown panic".to_owned())
}

#[cfg(test)]
mod tests {
    use std::collections::HashSet;
    use std::sync::Mutex;
    use std::time::Duration;

    use async_trait::async_trait;
    use keel_core::delivery::{Membership, Outcome, Settle};
    use keel_core::{Coordinates, DeliveryInfo, Envelope};

    use super::*;

    /// Owns the tokens in `owned`; records what was begun and settled.
    #[derive(Default)]
    struct Owner {
        owned: Mutex<HashSet<u64>>,
        /// Tokens of an assignment gone since (see `Settle::is_current`).
        stale: Mutex<HashSet<u64>>,
        begun: Mutex<Vec<u64>>,
        settled: Mutex<Vec<(u64, Outcome)>>,
    }

    impl Settle for Owner {
        fn settle(&self, token: u64, outcome: Outcome) {
            self.settled.lock().unwrap().push((token, outcome));
        }

        fn is_owned(&self, token: u64) -> bool {
            self.owned.lock().unwrap().contains(&token)
        }

        fn begin(&self, token: u64) -> bool {
            let owned = self.is_owned(token);
            if owned {
                self.begun.lock().unwrap().push(token);
            }
            owned
        }

        fn is_current(&self, token: u64) -> bool {
            !self.stale.lock().unwrap().contains(&token)
        }
    }

    /// Only a task the abort actually stopped counts as stopped: one that
    /// had settled and completed before the abort came is not reported
    /// (its event is not delivered again), nor is one that ended on its own.
    #[tokio::test]
    async fn only_handlers_the_abort_stopped_are_reported_as_stopped() {
        let owner = Arc::new(Owner::default());
        let ownership = |token| delivery_on(&owner, token, token as u32).ownership();
        let mut tasks = JoinSet::new();
        let mut running = Running::new();
        let done = tasks.spawn(async {});
        let stuck = tasks.spawn(std::future::pending());
        for (handle, partition) in [(&done, 1), (&stuck, 2)] {
            running.insert(
                handle.id(),
                Handling {
                    partition,
                    ownership: ownership(u64::from(partition)),
                    task: handle.clone(),
                    aborted: false,
                },
            );
        }
        // The first task has run to its end before the partitions go:
        // stopping it changes nothing; the second is stopped.
        while !done.is_finished() {
            tokio::task::yield_now().await;
        }
        stop_unowned(&[], &mut running);
        assert_eq!(running.len(), 2, "kept until joined");
        let mut stopped = Stopped::default();
        while let Some(result) = tasks.join_next_with_id().await {
            stopped.finished(&mut running, result);
        }
        assert!(running.is_empty());
        assert_eq!(stopped.0, BTreeMap::from([(2, 1)]));
        stopped.report();
        assert!(stopped.0.is_empty(), "reported once");
    }

    /// Deliveries of `tokens` (positions alike, a key each) settled by `owner`.
    fn deliveries(
        owner: &Arc<Owner>,
        tokens: impl IntoIterator<Item = u64>,
    ) -> Vec<Result<Delivery>> {
        tokens
            .into_iter()
            .map(|token| Ok(delivery_on(owner, token, 0)))
            .collect()
    }

    /// A delivery of `token` (its position, with a key of its own) on
    /// `partition`, settled by `owner`.
    fn delivery_on(owner: &Arc<Owner>, token: u64, partition: u32) -> Delivery {
        let info = DeliveryInfo {
            coordinates: Coordinates {
                topic: "t".into(),
                partition,
                position: token,
            },
            group: "g".into(),
            attempt: 1,
        };
        let event = Envelope::new("t", format!("k{token}"), "x");
        Delivery::new(event, info, owner.clone(), token)
    }

    struct Member;

    #[async_trait]
    impl Membership for Member {
        async fn leave(self: Box<Self>) -> Result<()> {
            Ok(())
        }
    }

    /// A member whose leave would wait `.0` for outstanding deliveries.
    struct Draining(Duration);

    #[async_trait]
    impl Membership for Draining {
        fn drain_timeout(&self) -> Option<Duration> {
            Some(self.0)
        }

        async fn leave(self: Box<Self>) -> Result<()> {
            Ok(())
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_handler_stuck_at_shutdown_is_abandoned_after_the_drain_timeout() {
        let owner = Arc::new(Owner::default());
        owner.owned.lock().unwrap().insert(1);
        let info = DeliveryInfo {
            coordinates: Coordinates {
                topic: "t".into(),
                partition: 0,
                position: 1,
            },
            group: "g".into(),
            attempt: 1,
        };
        let delivery = Delivery::new(Envelope::new("t", "k", "x"), info, owner.clone(), 1);
        let (_tx, assignment) = tokio::sync::watch::channel(Default::default());
        let stream = Deliveries::new(
            futures::stream::iter([Ok(delivery)]).chain(futures::stream::pending()),
            assignment,
            Box::new(Draining(Duration::from_secs(10))),
        );
        let started = Arc::new(tokio::sync::Notify::new());
        let running = started.clone();
        let pumped = pump(
            stream,
            Arc::new(Semaphore::new(4)),
            started.notified(),
            move |item| {
                let running = running.clone();
                async move {
                    running.notify_one();
                    let _held = item;
                    std::future::pending::<()>().await;
                }
            },
        );
        let left = tokio::time::timeout(Duration::from_secs(60), pumped).await;
        assert!(
            matches!(left, Ok(Ok(()))),
            "the pump must leave after the drain timeout: {left:?}"
        );
        let settled = owner.settled.lock().unwrap().clone();
        assert_eq!(
            settled,
            vec![(
                1,
                Outcome::Nack {
                    delay: Duration::ZERO
                }
            )],
            "the abandoned event goes back uncommitted"
        );
    }

    #[tokio::test]
    async fn handlers_of_a_partition_no_longer_owned_are_stopped() {
        let owner = Arc::new(Owner::default());
        owner.owned.lock().unwrap().extend([1, 2, 3]);
        let on = |token, partition| Ok(delivery_on(&owner, token, partition));
        let (assign, assignment) = tokio::sync::watch::channel(vec![0, 1]);
        let stream = Deliveries::new(
            futures::stream::iter([on(1, 0), on(2, 1), on(3, 1)]).chain(futures::stream::pending()),
            assignment,
            Box::new(Member),
        );
        let started = Arc::new(Mutex::new(Vec::new()));
        let ran = started.clone();
        // Two permits: 1 and 2 hang in their handlers, 3 waits for a permit.
        let pumped = tokio::spawn(pump(
            stream,
            Arc::new(Semaphore::new(2)),
            std::future::pending(),
            move |item| {
                let ran = ran.clone();
                async move {
                    let Item::Event(d) = item else { return };
                    let position = d.info().coordinates.position;
                    ran.lock().unwrap().push(position);
                    if position == 3 {
                        d.ack();
                        return;
                    }
                    let _held = d;
                    std::future::pending::<()>().await;
                }
            },
        ));
        let until = |want: Vec<u64>| {
            let started = started.clone();
            async move {
                for _ in 0..500 {
                    if *started.lock().unwrap() == want {
                        return;
                    }
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
                panic!(
                    "handlers started: {:?}, expected {want:?}",
                    started.lock().unwrap()
                );
            }
        };
        until(vec![1, 2]).await;
        // Partition 0 is taken from the member: its handler is stopped,
        // which frees the permit 3 waits for; partition 1's runs on.
        assign.send(vec![1]).unwrap();
        until(vec![1, 2, 3]).await;
        let settled = owner.settled.lock().unwrap().clone();
        assert!(
            settled.contains(&(
                1,
                Outcome::Nack {
                    delay: Duration::ZERO
                }
            )),
            "the stopped handler's event goes back uncommitted: {settled:?}"
        );
        assert!(
            !settled.iter().any(|(token, _)| *token == 2),
            "partition 1's handler runs on: {settled:?}"
        );
        pumped.abort();
    }

    #[tokio::test]
    async fn handlers_of_an_earlier_assignment_of_a_partition_still_owned_are_stopped() {
        let owner = Arc::new(Owner::default());
        owner.owned.lock().unwrap().extend([1, 2]);
        let (assign, assignment) = tokio::sync::watch::channel(vec![0, 1]);
        let stream = Deliveries::new(
            futures::stream::iter([Ok(delivery_on(&owner, 1, 0)), Ok(delivery_on(&owner, 2, 1))])
                .chain(futures::stream::pending()),
            assignment,
            Box::new(Member),
        );
        let (ran_tx, mut ran) = tokio::sync::mpsc::unbounded_channel();
        let pumped = tokio::spawn(pump(
            stream,
            Arc::new(Semaphore::new(4)),
            std::future::pending(),
            move |item| {
                let ran = ran_tx.clone();
                async move {
                    let Item::Event(d) = item else { return };
                    let _ = ran.send(d.info().coordinates.position);
                    let _held = d;
                    std::future::pending::<()>().await;
                }
            },
        ));
        let mut started = vec![ran.recv().await.unwrap(), ran.recv().await.unwrap()];
        started.sort_unstable();
        assert_eq!(started, vec![1, 2]);
        // Partition 0 was lost and taken again (or re-opened) while its
        // handler ran: the list the member owns reads as before.
        owner.stale.lock().unwrap().insert(1);
        assign.send(vec![0, 1]).unwrap();
        let nacked = Outcome::Nack {
            delay: Duration::ZERO,
        };
        for _ in 0..500 {
            if owner.settled.lock().unwrap().contains(&(1, nacked)) {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        // Time for a wrongly stopped handler of partition 1 to show too.
        tokio::time::sleep(Duration::from_millis(100)).await;
        let settled = owner.settled.lock().unwrap().clone();
        assert_eq!(
            settled,
            vec![(1, nacked)],
            "the stale handler is stopped, its event given back; partition 1's runs on"
        );
        pumped.abort();
    }

    #[tokio::test]
    async fn a_delivery_no_longer_owned_is_dropped_before_its_handler_runs() {
        let owner = Arc::new(Owner::default());
        owner.owned.lock().unwrap().extend([1, 3]);
        let (_tx, assignment) = tokio::sync::watch::channel(Default::default());
        let stream = Deliveries::new(
            futures::stream::iter(deliveries(&owner, 1..=3)),
            assignment,
            Box::new(Member),
        );
        let ran = Arc::new(Mutex::new(Vec::new()));
        pump(
            stream,
            Arc::new(Semaphore::new(1)),
            std::future::pending(),
            |item| {
                let ran = ran.clone();
                async move {
                    if let Item::Event(d) = item {
                        ran.lock().unwrap().push(d.info().coordinates.position);
                        d.ack();
                    }
                }
            },
        )
        .await
        .unwrap();
        assert_eq!(*ran.lock().unwrap(), vec![1, 3], "token 2 was not owned");
        let settled = owner.settled.lock().unwrap().clone();
        assert!(
            settled.contains(&(
                2,
                Outcome::Nack {
                    delay: Duration::ZERO
                }
            )),
            "{settled:?}"
        );
    }

    #[tokio::test]
    async fn a_delivery_is_begun_when_its_handler_starts_not_when_it_is_read() {
        let owner = Arc::new(Owner::default());
        owner.owned.lock().unwrap().extend([1, 2]);
        let (_tx, assignment) = tokio::sync::watch::channel(Default::default());
        let stream = Deliveries::new(
            futures::stream::iter(deliveries(&owner, 1..=2)).chain(futures::stream::pending()),
            assignment,
            Box::new(Member),
        );
        let release = Arc::new(tokio::sync::Notify::new());
        let (ran_tx, mut ran) = tokio::sync::mpsc::unbounded_channel();
        let handler_release = release.clone();
        let pumping = tokio::spawn(pump(
            stream,
            Arc::new(Semaphore::new(1)),
            std::future::pending(),
            move |item| {
                let (release, ran) = (handler_release.clone(), ran_tx.clone());
                async move {
                    if let Item::Event(d) = item {
                        let token = d.info().coordinates.position;
                        let _ = ran.send(token);
                        if token == 1 {
                            release.notified().await;
                        }
                        d.ack();
                    }
                }
            },
        ));
        assert_eq!(ran.recv().await, Some(1));
        // The pump has read delivery 2 and waits for the one permit.
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert_eq!(
            *owner.begun.lock().unwrap(),
            vec![1],
            "a delivery waiting for a handler is not begun (a revocation gives it back)"
        );
        release.notify_one();
        assert_eq!(ran.recv().await, Some(2));
        assert_eq!(*owner.begun.lock().unwrap(), vec![1, 2]);
        pumping.abort();
    }

    /// A member that, once leaving, still delivers what it must settle
    /// first, and is ready to leave once `.needed` of those are settled.
    struct Filling {
        owner: Arc<Owner>,
        leaving: Arc<std::sync::atomic::AtomicBool>,
        needed: Vec<u64>,
        drain: Duration,
    }

    #[async_trait]
    impl Membership for Filling {
        fn start_leaving(&self) -> bool {
            self.leaving
                .store(true, std::sync::atomic::Ordering::SeqCst);
            true
        }

        fn ready_to_leave(&self) -> bool {
            let settled = self.owner.settled.lock().unwrap();
            self.needed
                .iter()
                .all(|n| settled.iter().any(|(t, _)| t == n))
        }

        fn drain_timeout(&self) -> Option<Duration> {
            Some(self.drain)
        }

        async fn leave(self: Box<Self>) -> Result<()> {
            Ok(())
        }
    }

    /// Deliveries fed through the returned sender, of a [`Filling`] member
    /// owning `owned` that is ready to leave once `needed` are settled
    /// (drain timeout `drain` seconds); and the flag set when it starts
    /// leaving.
    fn filling(
        owner: &Arc<Owner>,
        owned: &[u64],
        needed: Vec<u64>,
        drain: u64,
    ) -> (
        Deliveries,
        tokio::sync::mpsc::UnboundedSender<Result<Delivery>>,
        Arc<std::sync::atomic::AtomicBool>,
    ) {
        owner.owned.lock().unwrap().extend(owned);
        let leaving = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        let (_assigned, assignment) = tokio::sync::watch::channel(Default::default());
        let stream = Deliveries::new(
            tokio_stream::wrappers::UnboundedReceiverStream::new(rx),
            assignment,
            Box::new(Filling {
                owner: owner.clone(),
                leaving: leaving.clone(),
                needed,
                drain: Duration::from_secs(drain),
            }),
        );
        (stream, tx, leaving)
    }

    #[tokio::test]
    async fn a_leave_first_runs_what_the_transport_still_delivers() {
        let owner = Arc::new(Owner::default());
        let (stream, tx, leaving) = filling(&owner, &[1, 2, 3], vec![2, 3], 30);
        tx.send(Ok(delivery_on(&owner, 1, 0))).unwrap();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let (ran_tx, mut ran) = tokio::sync::mpsc::unbounded_channel();
        let pumping = tokio::spawn(pump(
            stream,
            Arc::new(Semaphore::new(4)),
            async {
                let _ = stopped.await;
            },
            move |item| {
                let ran = ran_tx.clone();
                async move {
                    let Item::Event(d) = item else { return };
                    let _ = ran.send(d.info().coordinates.position);
                    d.ack();
                }
            },
        ));
        assert_eq!(ran.recv().await, Some(1));
        stop.send(()).unwrap();
        while !leaving.load(std::sync::atomic::Ordering::SeqCst) {
            tokio::task::yield_now().await;
        }
        // Delivered after the shutdown: still run, and the pump leaves
        // only once they are settled.
        tx.send(Ok(delivery_on(&owner, 2, 0))).unwrap();
        assert_eq!(ran.recv().await, Some(2));
        assert!(!pumping.is_finished());
        tx.send(Ok(delivery_on(&owner, 3, 0))).unwrap();
        assert_eq!(ran.recv().await, Some(3));
        tokio::time::timeout(Duration::from_secs(10), pumping)
            .await
            .expect("the pump leaves once nothing is left to settle")
            .unwrap()
            .unwrap();
    }

    /// A leaving pump waiting for a permit of a pool other pumps hold
    /// leaves once its own handler settled what the leave needs, not at
    /// the drain timeout; the delivery it held is dropped, not begun.
    #[tokio::test(start_paused = true)]
    async fn a_leave_waiting_for_a_shared_permit_ends_when_its_own_handlers_settle() {
        let owner = Arc::new(Owner::default());
        let (stream, tx, leaving) = filling(&owner, &[1, 2], vec![1], 60);
        // A pool of two, one permit held by another pump's handler.
        let permits = Arc::new(Semaphore::new(2));
        let _elsewhere = permits.clone().try_acquire_owned().unwrap();
        tx.send(Ok(delivery_on(&owner, 1, 0))).unwrap();
        tx.send(Ok(delivery_on(&owner, 2, 0))).unwrap();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let (release, released) = tokio::sync::oneshot::channel::<()>();
        let released = Arc::new(tokio::sync::Mutex::new(Some(released)));
        let (ran_tx, mut ran) = tokio::sync::mpsc::unbounded_channel();
        let pumping = tokio::spawn(pump(
            stream,
            permits,
            async {
                let _ = stopped.await;
            },
            move |item| {
                let (ran, released) = (ran_tx.clone(), released.clone());
                async move {
                    let Item::Event(d) = item else { return };
                    let _ = ran.send(d.info().coordinates.position);
                    if let Some(released) = released.lock().await.take() {
                        let _ = released.await;
                    }
                    d.ack();
                }
            },
        ));
        assert_eq!(ran.recv().await, Some(1));
        // Delivery 2 is read and waits for a permit; then the shutdown.
        stop.send(()).unwrap();
        while !leaving.load(std::sync::atomic::Ordering::SeqCst) {
            tokio::task::yield_now().await;
        }
        let started = tokio::time::Instant::now();
        release.send(()).unwrap();
        pumping.await.unwrap().unwrap();
        let waited = started.elapsed();
        assert!(waited < Duration::from_secs(1), "{waited:?}");
        assert_eq!(*owner.begun.lock().unwrap(), vec![1]);
        // 1 acked; 2 dropped unbegun, which nacks it for the next owner.
        let settled = owner.settled.lock().unwrap();
        assert!(
            matches!(settled[..], [(1, Outcome::Ack), (2, Outcome::Nack { .. })]),
            "{settled:?}"
        );
    }

    /// A shutdown that comes while the pump waits for a permit, with the
    /// leave ready at once, leaves without beginning the delivery it held.
    #[tokio::test(start_paused = true)]
    async fn a_leave_ready_at_once_does_not_wait_for_a_permit() {
        let owner = Arc::new(Owner::default());
        let (stream, tx, leaving) = filling(&owner, &[1], vec![], 60);
        let permits = Arc::new(Semaphore::new(1));
        let elsewhere = permits.clone().try_acquire_owned().unwrap();
        tx.send(Ok(delivery_on(&owner, 1, 0))).unwrap();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let pumping = tokio::spawn(pump(
            stream,
            permits,
            async {
                let _ = stopped.await;
            },
            |item| async move {
                if let Item::Event(d) = item {
                    d.ack();
                }
            },
        ));
        // Let the pump read delivery 1 and wait for the permit.
        for _ in 0..10 {
            tokio::task::yield_now().await;
        }
        stop.send(()).unwrap();
        while !leaving.load(std::sync::atomic::Ordering::SeqCst) {
            tokio::task::yield_now().await;
        }
        drop(elsewhere);
        pumping.await.unwrap().unwrap();
        assert!(owner.begun.lock().unwrap().is_empty());
    }

    #[tokio::test(start_paused = true)]
    async fn a_leave_waits_for_what_it_must_settle_at_most_the_drain_timeout() {
        let owner = Arc::new(Owner::default());
        let (_assigned, assignment) = tokio::sync::watch::channel(Default::default());
        let stream = Deliveries::new(
            futures::stream::pending(),
            assignment,
            Box::new(Filling {
                owner: owner.clone(),
                leaving: Default::default(),
                needed: vec![7],
                drain: Duration::from_secs(10),
            }),
        );
        let started = tokio::time::Instant::now();
        pump(
            stream,
            Arc::new(Semaphore::new(4)),
            async {},
            |_item| async {},
        )
        .await
        .unwrap();
        let waited = started.elapsed();
        assert!(
            waited >= Duration::from_secs(10) && waited < Duration::from_secs(11),
            "{waited:?}"
        );
    }
}
