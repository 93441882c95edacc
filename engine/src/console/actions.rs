//! The console's actions (POST): signing in and out, and the operators' verbs on instances, dead
//! letters and held sends, one or many at once.
//!
//! Each verb is the store's [`OperatorVerbs`](crate::store::OperatorVerbs) call the command line
//! makes (`cairn suspend|resume|terminate`, `cairn dead-letters resubmit|purge`, `cairn outbox
//! resume|dead-letter`), so it leaves the same records. Every action passes
//! [`Sessions::check_action`](super::auth::Sessions::check_action) first; a refusal is a 403
//! page with the reason, and nothing is done.

use axum::extract::State;
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Redirect, Response};
use chrono::Utc;
use maud::html;

use super::auth::{same_site, Refused};
use super::view::{self, Viewer};
use super::Shared;
use crate::store::{ControlAction, StoreError};

/// The fields of a posted form; a name may repeat (`ids`).
struct Form(Vec<(String, String)>);

impl Form {
    fn parse(body: &str) -> Self {
        Self(
            url::form_urlencoded::parse(body.as_bytes())
                .map(|(k, v)| (k.into_owned(), v.into_owned()))
                .collect(),
        )
    }

    fn get(&self, name: &str) -> Option<&str> {
        self.0
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }

    fn all(&self, name: &str) -> Vec<String> {
        self.0
            .iter()
            .filter(|(k, v)| k == name && !v.is_empty())
            .map(|(_, v)| v.clone())
            .collect()
    }

    /// Where to go back to: a path on this console, never another site.
    fn back(&self) -> String {
        match self.get("back") {
            Some(b) if b.starts_with('/') && !b.starts_with("//") => b.to_owned(),
            _ => "/".to_owned(),
        }
    }
}

fn refused(viewer: &Viewer, why: Refused) -> Response {
    let body = html! {
        div.refused #refused { "Refused: " (why.0) }
        p { a href="/login" { "Sign in" } " · " a href="/" { "Overview" } }
    };
    (
        StatusCode::FORBIDDEN,
        view::page("", "Action refused", viewer, body),
    )
        .into_response()
}

/// The outcome of an action on each item, as a page with a way back.
fn outcome(
    viewer: &Viewer,
    title: &str,
    lines: &[(String, Result<String, String>)],
    back: &str,
) -> Response {
    let body = html! {
        ul #outcome {
            @for (item, result) in lines {
                @match result {
                    Ok(text) => li { span.mono { (item) } ": " (text) },
                    Err(text) => li.refused { span.mono { (item) } ": " (text) },
                }
            }
        }
        @if lines.is_empty() { p.flash { "Nothing was selected." } }
        p { a #back href=(back) { "← Back" } }
    };
    view::page("", title, viewer, body).into_response()
}

/// GET `/login`.
pub async fn login_form(State(c): State<Shared>, headers: HeaderMap) -> Response {
    let viewer = c.viewer(&headers);
    let body = html! {
        @if !viewer.has_token {
            div.refused { "This console is read-only: it was started without --console-token." }
        } @else {
            form method="post" action="/login" {
                div.actions {
                    input #token type="password" name="token" placeholder="console token" autocomplete="current-password" size="32";
                    button #sign-in type="submit" { "Sign in" }
                }
            }
            p.note { "The token is the one given to the console with --console-token or CAIRN_CONSOLE_TOKEN. Signing in sets a session cookie for this browser." }
        }
    };
    view::page("", "Sign in", &viewer, body).into_response()
}

/// POST `/login`.
pub async fn login(State(c): State<Shared>, headers: HeaderMap, body: String) -> Response {
    let viewer = c.viewer(&headers);
    if let Err(why) = same_site(&headers) {
        return refused(&viewer, why);
    }
    let form = Form::parse(&body);
    match c.sessions.sign_in(form.get("token").unwrap_or_default()) {
        Ok(cookie) => ([(header::SET_COOKIE, cookie)], Redirect::to("/")).into_response(),
        Err(why) => refused(&viewer, why),
    }
}

/// POST `/logout`.
pub async fn logout(State(c): State<Shared>, headers: HeaderMap) -> Response {
    if let Err(why) = same_site(&headers) {
        return refused(&c.viewer(&headers), why);
    }
    c.sessions.sign_out(&headers);
    Redirect::to("/").into_response()
}

/// Checks the action; the form and the viewer, or the refusal page.
#[allow(clippy::result_large_err)]
fn checked(c: &Shared, headers: &HeaderMap, body: &str) -> Result<(Form, Viewer), Response> {
    let viewer = c.viewer(headers);
    let form = Form::parse(body);
    c.sessions
        .check_action(headers, form.get("csrf"))
        .map_err(|why| refused(&viewer, why))?;
    Ok((form, viewer))
}

fn said(e: StoreError) -> String {
    e.to_string()
}

/// POST `/actions/instances`: `action` (suspend, resume, terminate) on every `ids`.
pub async fn instances(State(c): State<Shared>, headers: HeaderMap, body: String) -> Response {
    let (form, viewer) = match checked(&c, &headers, &body) {
        Ok(f) => f,
        Err(page) => return page,
    };
    let reason = form.get("reason").map(str::trim).filter(|r| !r.is_empty());
    let action = match form.get("action") {
        Some("suspend") => ControlAction::Suspend {
            reason: reason.unwrap_or("suspended from the console").to_owned(),
        },
        Some("resume") => ControlAction::Resume { force: false },
        Some("terminate") => ControlAction::Terminate {
            reason: reason.unwrap_or("terminated from the console").to_owned(),
        },
        other => {
            return super::bad_request(
                &viewer,
                &format!("unknown action {other:?}: suspend, resume or terminate"),
            )
        }
    };
    let mut lines = Vec::new();
    for id in form.all("ids") {
        let result = match id.parse::<uuid::Uuid>() {
            Ok(uuid) => c
                .store
                .control(uuid, action.clone(), Utc::now())
                .await
                .map(|status| format!("now {status}"))
                .map_err(said),
            Err(_) => Err("not an instance id".to_owned()),
        };
        tracing::info!(instance.id = %id, ok = result.is_ok(), "console: {:?}", form.get("action"));
        lines.push((id, result));
    }
    outcome(&viewer, "Instances", &lines, &form.back())
}

/// POST `/actions/dead-letters`: `action` (resubmit, purge) on every `ids`.
pub async fn dead_letters(State(c): State<Shared>, headers: HeaderMap, body: String) -> Response {
    let (form, viewer) = match checked(&c, &headers, &body) {
        Ok(f) => f,
        Err(page) => return page,
    };
    let ids = form.all("ids");
    let mut lines = Vec::new();
    match form.get("action") {
        Some("resubmit") => {
            for id in ids {
                let result = match c.store.resubmit_dead_letter(&id, Utc::now()).await {
                    Ok(true) => Ok("back in the outbox".to_owned()),
                    Ok(false) => Err("no such dead-lettered send (a message that was never a send cannot be resubmitted)".to_owned()),
                    Err(e) => Err(said(e)),
                };
                lines.push((id, result));
            }
        }
        // With no ids the store would purge every dead letter: never from a form.
        Some("purge") if !ids.is_empty() => {
            let result = c
                .store
                .purge_dead_letters(&ids, None)
                .await
                .map(|n| format!("{n} dead letter(s) purged"))
                .map_err(said);
            lines.push((ids.join(", "), result));
        }
        Some("purge") => {}
        other => {
            return super::bad_request(
                &viewer,
                &format!("unknown action {other:?}: resubmit or purge"),
            )
        }
    }
    outcome(&viewer, "Dead letters", &lines, &form.back())
}

/// POST `/actions/sends`: `action` (resume, dead-letter) on every held send in `ids`.
pub async fn sends(State(c): State<Shared>, headers: HeaderMap, body: String) -> Response {
    let (form, viewer) = match checked(&c, &headers, &body) {
        Ok(f) => f,
        Err(page) => return page,
    };
    let mut lines = Vec::new();
    match form.get("action") {
        Some("resume") => {
            for id in form.all("ids") {
                let result = match c.store.resume_send(&id, Utc::now()).await {
                    Ok(true) => Ok("pending again".to_owned()),
                    Ok(false) => Err("not held (any more)".to_owned()),
                    Err(e) => Err(said(e)),
                };
                lines.push((id, result));
            }
        }
        Some("dead-letter") => {
            let reason = form
                .get("reason")
                .map(str::trim)
                .filter(|r| !r.is_empty())
                .unwrap_or("dead-lettered from the console");
            for id in form.all("ids") {
                let result = match c
                    .store
                    .give_up_sends(std::slice::from_ref(&id), reason, Utc::now())
                    .await
                {
                    Ok(0) => Err("no pending or held send with this id".to_owned()),
                    Ok(_) => Ok("dead-lettered".to_owned()),
                    Err(e) => Err(said(e)),
                };
                lines.push((id, result));
            }
        }
        other => {
            return super::bad_request(
                &viewer,
                &format!("unknown action {other:?}: resume or dead-letter"),
            )
        }
    }
    outcome(&viewer, "Held sends", &lines, &form.back())
}
