//! What the codec needs from a schema registry, and an in-process one.
//!
//! [`Registry`] is implemented by the HTTP [`RegistryClient`] (any
//! Confluent-compatible registry) and by [`LocalRegistry`], which keeps
//! schemas in memory for unit tests and benchmarks.
//!
//! [`RegistryClient`]: crate::client::RegistryClient

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use async_trait::async_trait;

use crate::canonical::{References, normal_form};
use crate::error::{Result, SchemaError};

/// A schema registry as the codec sees it.
#[async_trait]
pub trait Registry: Send + Sync {
    /// The schema registered under `id`, self-contained (references
    /// resolved into the document), in the normal form of
    /// [`crate::canonical`].
    async fn schema_by_id(&self, id: u32) -> Result<Arc<str>>;

    /// The id of `schema` under `subject`, or `None` if it is not registered
    /// there. Schemas compare by their normal form.
    async fn lookup(&self, subject: &str, schema: &str) -> Result<Option<u32>>;

    /// Registers `schema` under `subject` (a no-op returning the existing id
    /// when it is already there) and returns its global id.
    async fn register(&self, subject: &str, schema: &str) -> Result<u32>;
}

/// An in-memory registry: global ids by normal form, subjects as lists of
/// versions. No compatibility checks (the real registry does those).
#[derive(Debug, Default)]
pub struct LocalRegistry {
    state: Mutex<LocalState>,
}

#[derive(Debug, Default)]
struct LocalState {
    by_form: HashMap<String, u32>,
    by_id: HashMap<u32, Arc<str>>,
    subjects: HashMap<String, Vec<u32>>,
}

impl LocalRegistry {
    /// An empty registry.
    pub fn new() -> Self {
        Self::default()
    }

    fn state(&self) -> std::sync::MutexGuard<'_, LocalState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }
}

#[async_trait]
impl Registry for LocalRegistry {
    async fn schema_by_id(&self, id: u32) -> Result<Arc<str>> {
        self.state()
            .by_id
            .get(&id)
            .cloned()
            .ok_or(SchemaError::UnknownSchemaId(id))
    }

    async fn lookup(&self, subject: &str, schema: &str) -> Result<Option<u32>> {
        let form = normal_form(schema, &References::new())?;
        let state = self.state();
        let id = state.by_form.get(&form).copied();
        Ok(id.filter(|id| {
            state
                .subjects
                .get(subject)
                .is_some_and(|ids| ids.contains(id))
        }))
    }

    async fn register(&self, subject: &str, schema: &str) -> Result<u32> {
        let form = normal_form(schema, &References::new())?;
        let mut state = self.state();
        let next = state.by_id.len() as u32 + 1;
        let id = *state.by_form.entry(form.clone()).or_insert(next);
        state
            .by_id
            .entry(id)
            .or_insert_with(|| Arc::from(form.as_str()));
        let versions = state.subjects.entry(subject.to_owned()).or_default();
        if !versions.contains(&id) {
            versions.push(id);
        }
        Ok(id)
    }
}
