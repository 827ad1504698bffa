//! The boxed future that object-safe async traits (phases, providers, state
//! backends) return: a trait object cannot have `async fn`s of its own.

use std::future::Future;
use std::pin::Pin;

pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;
