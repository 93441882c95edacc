//! The engine's record of an instance's transactional scopes: which are open, which completed
//! (with the data their compensation needs), and the compensation under way.
//!
//! It is saved with the instance's other bookkeeping (`instances.engine_state`) at every
//! persistence point. Compensation runs one scope per persistence point, driven by `compensate`
//! messages the engine addresses to the instance: each point that runs a step writes the message
//! for the next one, so a step is never run twice nor skipped, whatever crashes in between.

use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::context::ScopeKind;
use crate::orchestration::Event;
use crate::store::{MessageKind, NewMessage};

/// An instance's scopes.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Scopes {
    /// Open scopes, innermost last.
    pub open: Vec<OpenScope>,
    /// Scopes that ended successfully and have not been compensated, oldest first.
    pub completed: Vec<CompletedScope>,
    /// Compensations asked for and not yet run, next first.
    pub compensating: Vec<CompletedScope>,
    /// The compensation request under way: (its number, the scope name asked for, done so far).
    pub request: Option<(u64, String, usize)>,
    /// Numbers scopes and compensation requests.
    pub counter: u64,
}

/// An open scope.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct OpenScope {
    /// Unique within the instance.
    pub id: u64,
    /// The name it was given.
    pub name: String,
    /// Atomic or long-running.
    pub kind: ScopeKind,
}

/// A scope that ended successfully, with what its compensation needs.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CompletedScope {
    /// Unique within the instance.
    pub id: u64,
    /// The name it was given.
    pub name: String,
    /// The names of the scopes it was nested in, outermost first.
    pub within: Vec<String>,
    /// What `end_scope_with` recorded.
    pub data: serde_json::Value,
}

impl Scopes {
    /// Opens a scope nested in the innermost open one.
    pub fn begin(&mut self, name: String, kind: ScopeKind) {
        self.counter += 1;
        self.open.push(OpenScope {
            id: self.counter,
            name,
            kind,
        });
    }

    /// Ends the innermost open scope successfully, recording `data` for its compensation.
    /// Returns it, or `None` when no scope is open.
    pub fn end(&mut self, data: serde_json::Value) -> Option<OpenScope> {
        let scope = self.open.pop()?;
        self.completed.push(CompletedScope {
            id: scope.id,
            name: scope.name.clone(),
            within: self.open.iter().map(|s| s.name.clone()).collect(),
            data,
        });
        Some(scope)
    }

    /// The innermost open scope's name, if it is atomic.
    pub fn innermost_atomic(&self) -> Option<&str> {
        self.open
            .last()
            .filter(|s| s.kind == ScopeKind::Atomic)
            .map(|s| s.name.as_str())
    }

    /// Queues the compensation of the completed scopes named `scope` (or all) and those nested
    /// in them, newest first. Returns the message that starts it, unless one is under way (it
    /// then takes these scopes too).
    pub fn request_compensation(
        &mut self,
        scope: Option<String>,
        instance: Uuid,
    ) -> Option<NewMessage> {
        let wanted = |c: &CompletedScope| match &scope {
            None => true,
            Some(name) => c.name == *name || c.within.contains(name),
        };
        let (mut chosen, kept): (Vec<CompletedScope>, Vec<CompletedScope>) =
            std::mem::take(&mut self.completed)
                .into_iter()
                .partition(wanted);
        self.completed = kept;
        chosen.reverse();
        let idle = self.compensating.is_empty() && self.request.is_none();
        self.compensating.extend(chosen);
        if !idle {
            return None;
        }
        self.counter += 1;
        self.request = Some((self.counter, scope.unwrap_or_default(), 0));
        self.next_message(instance)
    }

    /// Records that the scope taken by [`Scopes::take_event`] was compensated; returns the
    /// message for the next step.
    pub fn compensated(&mut self, instance: Uuid) -> Option<NewMessage> {
        if let Some(request) = &mut self.request {
            request.2 += 1;
        }
        self.next_message(instance)
    }

    /// The event a `compensate` message stands for, if it is still due; a compensation event
    /// takes its scope off the queue.
    pub fn take_event(&mut self, body: &serde_json::Value) -> Option<Event> {
        if let Some(id) = body.get("scope_id").and_then(serde_json::Value::as_u64) {
            if self.compensating.first().is_none_or(|c| c.id != id) {
                return None;
            }
            let scope = self.compensating.remove(0);
            return Some(Event::Compensate {
                scope: scope.name,
                data: scope.data,
                remaining: self.compensating.len(),
            });
        }
        let request = body.get("request").and_then(serde_json::Value::as_u64)?;
        match self.request.take() {
            Some((current, scope, count)) if current == request => {
                Some(Event::Compensated { scope, count })
            }
            other => {
                self.request = other;
                None
            }
        }
    }

    /// The message that drives the next step: the next scope to compensate, or the news that
    /// all of them are done.
    fn next_message(&self, instance: Uuid) -> Option<NewMessage> {
        if let Some(next) = self.compensating.first() {
            return Some(NewMessage::to_instance(
                format!("{instance}:compensate:{}", next.id),
                "compensate",
                MessageKind::Compensate,
                serde_json::json!({ "scope_id": next.id, "scope": next.name }),
                instance,
            ));
        }
        let (request, name, count) = self.request.as_ref()?;
        Some(NewMessage::to_instance(
            format!("{instance}:compensated:{request}"),
            "compensated",
            MessageKind::Compensate,
            serde_json::json!({ "request": request, "scope": name, "count": count }),
            instance,
        ))
    }
}
