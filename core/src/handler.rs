//! The handler trait: what a service author writes to react to an event.
//!
//! A handler is a plain async function of the event; middleware (retry,
//! dead letters, inbox, tracing) is a handler that wraps a handler. A
//! handler returns `Ok` when the event's effect is done, or an [`Error`]
//! whose [`Error::is_retriable`] decides between another attempt and dead
//! letters.

use std::future::Future;
use std::sync::Arc;

use async_trait::async_trait;

use crate::delivery::DeliveryInfo;
use crate::envelope::Envelope;
use crate::error::Result;

/// Reacts to one event.
#[async_trait]
pub trait Handler: Send + Sync + 'static {
    /// Handles `event`; `Ok` acknowledges it.
    async fn handle(&self, event: &Envelope, info: &DeliveryInfo) -> Result<()>;
}

#[async_trait]
impl<H: Handler + ?Sized> Handler for Arc<H> {
    async fn handle(&self, event: &Envelope, info: &DeliveryInfo) -> Result<()> {
        (**self).handle(event, info).await
    }
}

#[async_trait]
impl<H: Handler + ?Sized> Handler for Box<H> {
    async fn handle(&self, event: &Envelope, info: &DeliveryInfo) -> Result<()> {
        (**self).handle(event, info).await
    }
}

/// A handler made from an async closure taking the event by value.
pub struct HandlerFn<F>(F);

/// Turns `|event, info| async move { … }` into a [`Handler`]. The closure
/// gets its own copy of the envelope (the payload is reference-counted, so
/// the copy is cheap).
pub fn handler_fn<F, Fut>(f: F) -> HandlerFn<F>
where
    F: Fn(Envelope, DeliveryInfo) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<()>> + Send + 'static,
{
    HandlerFn(f)
}

#[async_trait]
impl<F, Fut> Handler for HandlerFn<F>
where
    F: Fn(Envelope, DeliveryInfo) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<()>> + Send + 'static,
{
    async fn handle(&self, event: &Envelope, info: &DeliveryInfo) -> Result<()> {
        (self.0)(event.clone(), info.clone()).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::delivery::Coordinates;
    use crate::error::Error;

    #[tokio::test]
    async fn closures_are_handlers_and_errors_pass_through() {
        let h = handler_fn(|event: Envelope, info: DeliveryInfo| async move {
            if info.attempt < 2 {
                Err(Error::retriable(format!("{} not yet", event.key())))
            } else {
                Ok(())
            }
        });
        let boxed: Box<dyn Handler> = Box::new(h);
        let mut info = DeliveryInfo {
            coordinates: Coordinates {
                topic: "t".into(),
                partition: 0,
                position: 0,
            },
            group: "g".into(),
            attempt: 1,
        };
        let event = Envelope::new("e", "order-1", "");
        let err = boxed.handle(&event, &info).await.unwrap_err();
        assert!(err.is_retriable());
        assert_eq!(err.to_string(), "handler failed: order-1 not yet");
        info.attempt = 2;
        boxed.handle(&event, &info).await.unwrap();
    }
}
