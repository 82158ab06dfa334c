//! Helpers for testing one layer around a stand-in handler.

use std::future::Future;

use futures::FutureExt;

use super::context::Context;
use super::handler::Endpoint;
use super::layer::{Layer, Next, Verdict};

/// Runs `layer` on `ctx` with `inner` as the rest of the chain; returns the
/// verdict and the context.
pub(crate) async fn run_layer_with<L, F>(
    layer: &L,
    mut ctx: Context,
    inner: F,
) -> (Verdict, Context)
where
    L: Layer + ?Sized,
    F: Fn() -> Verdict + Send + Sync + 'static,
{
    let endpoint = Endpoint::Func(Box::new(move || {
        let v = inner();
        async move { v }.boxed()
    }));
    let next = Next {
        layers: &[],
        endpoint: &endpoint,
        route: None,
    };
    let verdict = layer.call(&mut ctx, next).await;
    (verdict, ctx)
}

/// [`run_layer_with`], the verdict only.
pub(crate) async fn run_layer<L, F>(layer: &L, ctx: Context, inner: F) -> Verdict
where
    L: Layer + ?Sized,
    F: Fn() -> Verdict + Send + Sync + 'static,
{
    run_layer_with(layer, ctx, inner).await.0
}

/// Runs `layer` on `ctx` with an async stand-in handler.
pub(crate) async fn run_layer_async<L, F, Fut>(layer: &L, mut ctx: Context, inner: F) -> Verdict
where
    L: Layer + ?Sized,
    F: Fn() -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Verdict> + Send + 'static,
{
    let endpoint = Endpoint::Func(Box::new(move || inner().boxed()));
    let next = Next {
        layers: &[],
        endpoint: &endpoint,
        route: None,
    };
    layer.call(&mut ctx, next).await
}
