//! Typed handlers and the end of the chain: decode the payload into the
//! route's Rust type (resolving the writer's schema against it, so old and
//! new versions of an event both decode) and call the handler.

use std::future::Future;
use std::marker::PhantomData;
use std::sync::Arc;

use async_trait::async_trait;
use keel_core::{Envelope, Error, Result};
use keel_schemas::AvroCodec;
use keel_schemas::events::Event;

use super::context::{Context, EventContext, Incoming};
use super::layer::{DeadLetterReason, Verdict};
use super::poison;

/// Handles one event type, decoded.
///
/// Return `Ok` once the effect is done; a retriable error
/// ([`Error::retriable`]) asks for another attempt, any other error sends
/// the event to dead letters.
#[async_trait]
pub trait EventHandler<T>: Send + Sync + 'static {
    /// Handles `event`; `ctx` has its envelope, delivery facts and (with the
    /// inbox layer) the transaction to apply effects in.
    async fn handle(&self, event: T, ctx: EventContext<'_>) -> Result<()>;
}

/// A handler made from an async closure of the decoded event and its
/// envelope (see [`from_fn`]).
pub struct FnHandler<F>(F);

/// Turns `|event: T, envelope: Envelope| async move { … }` into an
/// [`EventHandler`]. Handlers that need the inbox's transaction implement
/// the trait instead.
pub fn from_fn<T, F, Fut>(f: F) -> FnHandler<F>
where
    F: Fn(T, Envelope) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<()>> + Send + 'static,
{
    FnHandler(f)
}

#[async_trait]
impl<T, F, Fut> EventHandler<T> for FnHandler<F>
where
    T: Send + 'static,
    F: Fn(T, Envelope) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<()>> + Send + 'static,
{
    async fn handle(&self, event: T, ctx: EventContext<'_>) -> Result<()> {
        (self.0)(event, ctx.envelope.clone()).await
    }
}

/// A registered handler of one event type.
#[async_trait]
pub(crate) trait Route: Send + Sync {
    /// The Avro full name it handles.
    fn event_type(&self) -> &'static str;
    /// Decodes and handles the context's event.
    async fn call(&self, codec: &AvroCodec, ctx: &mut Context) -> Verdict;
}

pub(crate) struct Typed<T, H> {
    handler: H,
    event: PhantomData<fn() -> T>,
}

impl<T, H> Typed<T, H> {
    pub(crate) fn new(handler: H) -> Self {
        Typed {
            handler,
            event: PhantomData,
        }
    }
}

#[async_trait]
impl<T, H> Route for Typed<T, H>
where
    T: Event + Send + 'static,
    H: EventHandler<T>,
{
    fn event_type(&self) -> &'static str {
        T::FULL_NAME
    }

    async fn call(&self, codec: &AvroCodec, ctx: &mut Context) -> Verdict {
        let Context {
            incoming,
            info,
            span,
            transaction,
            outbox,
            ..
        } = ctx;
        let Incoming::Event(envelope) = incoming else {
            return poison::undecodable(incoming);
        };
        let event = match codec.decode::<T>(envelope.payload()).await {
            Ok(event) => event,
            Err(e) => return poison::decode_failure(e),
        };
        let ctx = EventContext {
            envelope,
            info,
            span: *span,
            transaction,
            outbox: outbox.as_ref(),
        };
        // A panic is a failed attempt like any other (retried within the
        // budget, then dead-lettered): `Next::run` catches it around this
        // call, one catch for the dispatch and the handler.
        Verdict::from_result(self.handler.handle(event, ctx).await)
    }
}

/// What the router does with an event type no handler is registered for.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum UnknownTypes {
    /// Ack it and count it (`keel_router_events_total{verdict="skipped"}`):
    /// other services' events on a shared topic are not errors.
    #[default]
    Skip,
    /// Send it to dead letters.
    DeadLetter,
}

/// The end of the chain.
pub(crate) enum Endpoint {
    Routes {
        codec: Arc<AvroCodec>,
        unknown: UnknownTypes,
        /// Larger payloads are poison, never decoded.
        max_payload: usize,
    },
    /// A stand-in handler for testing a layer on its own.
    #[cfg(test)]
    Func(Box<dyn Fn() -> futures::future::BoxFuture<'static, Verdict> + Send + Sync>),
}

impl Endpoint {
    pub(crate) async fn call(&self, ctx: &mut Context, route: Option<&dyn Route>) -> Verdict {
        let (codec, unknown, max_payload) = match self {
            Endpoint::Routes {
                codec,
                unknown,
                max_payload,
            } => (codec, *unknown, *max_payload),
            #[cfg(test)]
            Endpoint::Func(f) => return f().await,
        };
        if let Incoming::Undecodable { .. } = ctx.incoming {
            return poison::undecodable(&ctx.incoming);
        }
        if let Some(route) = route {
            if let Some(size) = ctx.event().map(|e| e.payload().len())
                && size > max_payload
            {
                return poison::oversize(size, max_payload);
            }
            return route.call(codec, ctx).await;
        }
        match unknown {
            UnknownTypes::Skip => Verdict::Skipped {
                reason: "unknown-type",
            },
            UnknownTypes::DeadLetter => Verdict::DeadLetter {
                error: Error::malformed(format!(
                    "no handler for event type `{}` on topic `{}`",
                    ctx.event().map_or("?", Envelope::event_type),
                    ctx.info.coordinates.topic
                )),
                reason: DeadLetterReason::UnknownType,
            },
        }
    }
}
