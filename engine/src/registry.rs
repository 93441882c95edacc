//! The registry of orchestration definitions a host can run, by name and version.
//!
//! It erases each [`Orchestration`]'s types behind [`Definition`], so that the host can hold
//! states of many definitions side by side, decode them from the database, and run their
//! transitions without knowing their types.

use std::any::Any;
use std::collections::BTreeMap;
use std::marker::PhantomData;
use std::sync::Arc;

use crate::codec::{self, CodecError};
use crate::context::Context;
use crate::orchestration::{Event, Fault, Next, OnFault, Orchestration, ScopeFault, StoredState};

/// A state held in memory, of whichever definition's type.
pub type AnyState = Box<dyn Any + Send + Sync>;

/// What a transition decided, with its types erased.
pub enum AnyNext {
    /// Continue with this state.
    Continue(AnyState),
    /// Completed with this output.
    Complete(serde_json::Value),
    /// Failed for a business reason.
    Fail(String),
}

/// An orchestration definition with its types erased.
pub trait Definition: Send + Sync {
    /// `Orchestration::NAME`.
    fn name(&self) -> &'static str;
    /// `Orchestration::VERSION`.
    fn version(&self) -> u32;
    /// `Orchestration::ACTIVATED_BY`.
    fn activated_by(&self) -> &'static [&'static str];
    /// Runs the start transition on a JSON input.
    ///
    /// # Errors
    /// The input does not decode, or the transition failed.
    fn start(&self, ctx: &mut Context, input: serde_json::Value) -> Result<AnyNext, Fault>;
    /// Runs an event transition.
    ///
    /// # Errors
    /// The transition failed.
    fn on_event(&self, ctx: &mut Context, state: AnyState, event: Event) -> Result<AnyNext, Fault>;
    /// Runs a scope's exception handler.
    ///
    /// # Errors
    /// The handler did not handle the fault.
    fn on_fault(
        &self,
        ctx: &mut Context,
        state: AnyState,
        fault: ScopeFault,
    ) -> Result<AnyNext, Fault>;
    /// `Orchestration::CONVOY`.
    fn convoy(&self) -> &'static [&'static str];
    /// The convoy properties sorted and comma-separated, as `subscriptions.correlation_keys`
    /// stores them (empty for no convoy).
    fn convoy_keys(&self) -> String {
        let mut keys = self.convoy().to_vec();
        keys.sort_unstable();
        keys.join(",")
    }
    /// `Orchestration::ON_UNHANDLED_FAULT`.
    fn on_unhandled_fault(&self) -> OnFault;
    /// `Orchestration::FILTER`.
    fn filter(&self) -> &'static str {
        ""
    }
    /// `Orchestration::STEPS`.
    fn steps(&self) -> &'static [&'static str] {
        &[]
    }
    /// `Orchestration::TRANSITIONS`.
    fn transitions(&self) -> &'static [(&'static str, &'static str)] {
        &[]
    }
    /// A copy of a state (a scope's rollback point).
    ///
    /// # Errors
    /// The state is not of this definition's type.
    fn clone_state(&self, state: &AnyState) -> Result<AnyState, Fault>;
    /// Decodes a stored state.
    ///
    /// # Errors
    /// [`CodecError::Decode`] for a corrupt or incompatible state.
    fn decode_state(&self, bytes: &[u8]) -> Result<AnyState, CodecError>;
    /// Encodes a state for storage.
    ///
    /// # Errors
    /// [`CodecError::Encode`].
    fn encode_state(&self, state: &AnyState) -> Result<Vec<u8>, CodecError>;
    /// `Orchestration::upgrade`: the state of version `from`, as stored, migrated to this
    /// version and encoded.
    ///
    /// # Errors
    /// The migration refused the state, or its result does not encode.
    fn upgrade_state(&self, from: u32, bytes: &[u8]) -> Result<Vec<u8>, Fault>;
}

struct Typed<O>(PhantomData<fn() -> O>);

fn erase<O: Orchestration>(next: Next<O>) -> Result<AnyNext, Fault> {
    Ok(match next {
        Next::Continue(state) => AnyNext::Continue(Box::new(state)),
        Next::Complete(output) => AnyNext::Complete(serde_json::to_value(output)?),
        Next::Fail(reason) => AnyNext::Fail(reason),
    })
}

/// The input of an instance does not decode as the definition's `Input`.
#[derive(Debug, thiserror::Error)]
#[error("input does not decode as {target}: {source}")]
pub struct InputError {
    target: &'static str,
    #[source]
    source: serde_json::Error,
}

/// A state handed to a definition that is not its own type (an engine bug, reported not panicked).
#[derive(Debug, thiserror::Error)]
#[error("state held in memory is not a {0}")]
pub struct StateTypeMismatch(&'static str);

impl<O: Orchestration> Definition for Typed<O> {
    fn name(&self) -> &'static str {
        O::NAME
    }
    fn version(&self) -> u32 {
        O::VERSION
    }
    fn activated_by(&self) -> &'static [&'static str] {
        O::ACTIVATED_BY
    }
    fn start(&self, ctx: &mut Context, input: serde_json::Value) -> Result<AnyNext, Fault> {
        let input: O::Input = serde_json::from_value(input).map_err(|source| InputError {
            target: std::any::type_name::<O::Input>(),
            source,
        })?;
        erase(O::start(ctx, input)?)
    }
    fn on_event(&self, ctx: &mut Context, state: AnyState, event: Event) -> Result<AnyNext, Fault> {
        let state = state
            .downcast::<O::State>()
            .map_err(|_| StateTypeMismatch(std::any::type_name::<O::State>()))?;
        erase(O::on_event(ctx, *state, event)?)
    }
    fn on_fault(
        &self,
        ctx: &mut Context,
        state: AnyState,
        fault: ScopeFault,
    ) -> Result<AnyNext, Fault> {
        let state = state
            .downcast::<O::State>()
            .map_err(|_| StateTypeMismatch(std::any::type_name::<O::State>()))?;
        erase(O::on_fault(ctx, *state, fault)?)
    }
    fn on_unhandled_fault(&self) -> OnFault {
        O::ON_UNHANDLED_FAULT
    }
    fn steps(&self) -> &'static [&'static str] {
        O::STEPS
    }
    fn transitions(&self) -> &'static [(&'static str, &'static str)] {
        O::TRANSITIONS
    }
    fn convoy(&self) -> &'static [&'static str] {
        O::CONVOY
    }
    fn filter(&self) -> &'static str {
        O::FILTER
    }
    fn clone_state(&self, state: &AnyState) -> Result<AnyState, Fault> {
        let state = state
            .downcast_ref::<O::State>()
            .ok_or(StateTypeMismatch(std::any::type_name::<O::State>()))?;
        Ok(Box::new(state.clone()))
    }
    fn decode_state(&self, bytes: &[u8]) -> Result<AnyState, CodecError> {
        Ok(Box::new(codec::decode::<O::State>(bytes)?))
    }
    fn encode_state(&self, state: &AnyState) -> Result<Vec<u8>, CodecError> {
        match state.downcast_ref::<O::State>() {
            Some(state) => codec::encode(state),
            None => Err(CodecError::Encode(rmp_serde::encode::Error::Syntax(
                StateTypeMismatch(std::any::type_name::<O::State>()).to_string(),
            ))),
        }
    }
    fn upgrade_state(&self, from: u32, bytes: &[u8]) -> Result<Vec<u8>, Fault> {
        let state = O::upgrade(StoredState {
            version: from,
            bytes,
        })?;
        Ok(codec::encode(&state)?)
    }
}

/// The definitions a host runs.
#[derive(Clone, Default)]
pub struct Registry {
    by_key: BTreeMap<(String, u32), Arc<dyn Definition>>,
    /// Versions pinned as the default of their name ([`Registry::register_default`]).
    defaults: BTreeMap<String, u32>,
}

impl std::fmt::Debug for Registry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_list().entries(self.by_key.keys()).finish()
    }
}

impl Registry {
    /// An empty registry.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds a definition. A later registration of the same name and version replaces it.
    #[must_use]
    pub fn register<O: Orchestration>(mut self) -> Self {
        self.by_key.insert(
            (O::NAME.to_owned(), O::VERSION),
            Arc::new(Typed::<O>(PhantomData)),
        );
        self
    }

    /// Adds a definition and pins it as the default of its name: new starts and activations
    /// take it even when a newer version is registered (the newer one runs the instances that
    /// are on it, or that `cairn upgrade` moves to it).
    #[must_use]
    pub fn register_default<O: Orchestration>(mut self) -> Self {
        self.defaults.insert(O::NAME.to_owned(), O::VERSION);
        self.register::<O>()
    }

    /// The version new starts and activations of `name` take: the one pinned with
    /// [`Registry::register_default`], else the newest registered.
    pub fn current(&self, name: &str) -> Option<&Arc<dyn Definition>> {
        self.defaults
            .get(name)
            .and_then(|v| self.get(name, *v))
            .or_else(|| self.latest(name))
    }

    /// Every registered `(name, version)`, in order.
    pub fn versions(&self) -> Vec<(String, u32)> {
        self.by_key.keys().cloned().collect()
    }

    /// The definition with this name and version.
    pub fn get(&self, name: &str, version: u32) -> Option<&Arc<dyn Definition>> {
        self.by_key.get(&(name.to_owned(), version))
    }

    /// The newest version registered under `name`.
    pub fn latest(&self, name: &str) -> Option<&Arc<dyn Definition>> {
        self.by_key
            .range((name.to_owned(), 0)..=(name.to_owned(), u32::MAX))
            .next_back()
            .map(|(_, d)| d)
    }

    /// Every definition, in name and version order.
    pub fn definitions(&self) -> impl Iterator<Item = &Arc<dyn Definition>> {
        self.by_key.values()
    }
}
