//! Routing decisions both stores share: where a published message goes, given the
//! subscription rows a store read for it.
//!
//! A store reads, per message type, the correlation key sets (`subscription_keys`), the
//! instance subscriptions matching the values the messages carry for each set, and the
//! activating subscription, into a [`RouteCache`]: once per type for a batch of messages, or
//! for one message alone.

use std::collections::{BTreeSet, HashMap};

use uuid::Uuid;

use super::NewMessage;
use crate::filter::Filter;
use crate::orchestration::Correlation;

/// Where a message goes.
pub(crate) enum Route {
    /// To this instance, through this subscription (none for a message addressed to it).
    Instance(Uuid, Option<Uuid>),
    /// It starts a new instance of this definition.
    Activate {
        orchestration: String,
        version: u32,
        /// For a convoy: the activating message's values of the convoy properties.
        convoy: Option<Correlation>,
    },
    /// Nowhere yet, for this reason.
    Unrouted(String),
}

/// How many bytes of a message type, a property name or a value an unrouted reason quotes.
const QUOTED_BYTES: usize = 64;

/// How many properties an unrouted reason names.
const NAMED_PROPERTIES: usize = 16;

/// `text`, cut to [`QUOTED_BYTES`] (at a character boundary) with its length when longer, so that
/// a reason never copies a large value.
fn quote(text: &str) -> std::borrow::Cow<'_, str> {
    if text.len() <= QUOTED_BYTES {
        return text.into();
    }
    let mut end = QUOTED_BYTES;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}... ({} bytes)", &text[..end], text.len()).into()
}

/// The route of a message of a type that activates `orchestration`, whose activating
/// subscription is correlated on `keys` (a convoy) or not (empty): a convoy's message must carry
/// every convoy property.
fn activation_route(msg: &NewMessage, orchestration: String, version: u32, keys: &str) -> Route {
    let convoy = if keys.is_empty() {
        None
    } else {
        match Correlation::from_properties(keys, &msg.properties) {
            Some(values) => Some(values),
            None => {
                return Route::Unrouted(format!(
                    "message type {:?} starts a convoy on properties {keys:?}, which the message does not all carry",
                    quote(&msg.message_type)
                ))
            }
        }
    };
    Route::Activate {
        orchestration,
        version,
        convoy,
    }
}

/// The route of a message nothing subscribes to. The reason quotes the type and the properties
/// cut short ([`quote`], at most [`NAMED_PROPERTIES`] of them): never a large value in full.
fn unrouted(msg: &NewMessage) -> Route {
    let mut props = msg
        .properties
        .iter()
        .take(NAMED_PROPERTIES)
        .map(|(k, v)| format!("{}={}", quote(k), quote(v)))
        .collect::<Vec<_>>();
    if msg.properties.len() > NAMED_PROPERTIES {
        props.push(format!(
            "... {} more",
            msg.properties.len() - NAMED_PROPERTIES
        ));
    }
    Route::Unrouted(format!(
        "no subscription matches message type {:?} with properties {{{}}}",
        quote(&msg.message_type),
        props.join(",")
    ))
}

/// The route of a message of a type whose activating subscriptions' filters all turn it away.
fn filtered_out(msg: &NewMessage, rows: &[ActivationRow]) -> Route {
    let Route::Unrouted(reason) = unrouted(msg) else {
        return unrouted(msg);
    };
    let names: Vec<String> = rows
        .iter()
        .take(NAMED_PROPERTIES)
        .map(|a| match &a.filter {
            Ok(_) => quote(&a.orchestration).into_owned(),
            Err(_) => format!("{} (its filter does not parse)", quote(&a.orchestration)),
        })
        .collect();
    Route::Unrouted(format!(
        "{reason}: the filters of the activating subscriptions of {} do not pass it",
        names.join(", ")
    ))
}

/// The reason of a message no instance or activation took, but send ports did.
pub(crate) fn sent_to_ports(ports: &[String]) -> String {
    format!(
        "sent to send port(s) {} by their subscriptions",
        ports.join(", ")
    )
}

/// The routing rows of a batch's message types, read once per type.
#[derive(Default)]
pub(crate) struct RouteCache {
    /// Per message type: the correlation key sets, in the order routing tries them.
    key_sets: HashMap<String, Vec<String>>,
    /// Per (type, canonical correlation): the oldest instance subscription and its instance.
    subscriptions: HashMap<(String, String), (Uuid, Uuid)>,
    /// Per type: the activating subscriptions, by orchestration name.
    activations: HashMap<String, Vec<ActivationRow>>,
    /// Per type: the send ports' subscriptions.
    ports: HashMap<String, Vec<ActivationRow>>,
}

/// An activating subscription as routing reads it: a definition, the version new instances
/// start on, its convoy keys, and its filter (parsed, or why it does not parse: then it routes
/// nothing, and the row says why in `filter_error`).
#[derive(Debug, Clone)]
pub(crate) struct ActivationRow {
    pub(crate) orchestration: String,
    pub(crate) version: u32,
    pub(crate) convoy: String,
    pub(crate) filter: Result<Filter, String>,
    /// A send port's subscription: the port (the message is sent to it, besides its route).
    pub(crate) port: Option<String>,
}

/// An orchestration that subscribes to a message by its activating subscription: it receives
/// the message (or a copy), at its running instance for the message's correlation, or at a new
/// one.
#[derive(Debug, Clone)]
pub(crate) struct Subscriber {
    pub(crate) orchestration: String,
    /// The version a new instance starts on.
    pub(crate) version: u32,
    /// For a convoy: the message's values of the convoy properties.
    pub(crate) convoy: Option<Correlation>,
    /// The correlations its running instance is looked for by (`subscriptions.correlation`): a
    /// convoy's values, else those the message carries for its type's key sets.
    pub(crate) correlations: Vec<String>,
}

impl ActivationRow {
    /// Whether `msg` passes its filter (a filter that does not parse passes nothing).
    fn passes(&self, msg: &NewMessage) -> bool {
        self.filter
            .as_ref()
            .is_ok_and(|f| f.matches(&msg.properties))
    }
}

impl RouteCache {
    /// The published (not addressed) messages of a batch, by type.
    pub(crate) fn by_type<'m>(
        messages: impl IntoIterator<Item = &'m NewMessage>,
    ) -> HashMap<&'m str, Vec<&'m NewMessage>> {
        let mut by_type: HashMap<&str, Vec<&NewMessage>> = HashMap::new();
        for msg in messages.into_iter().filter(|m| m.target.is_none()) {
            by_type.entry(&msg.message_type).or_default().push(msg);
        }
        by_type
    }

    /// Records a type's key sets; returns the canonical values `msgs` carry for them, which
    /// are the correlations to read subscriptions for.
    pub(crate) fn key_sets(
        &mut self,
        message_type: &str,
        key_sets: Vec<String>,
        msgs: &[&NewMessage],
    ) -> Vec<String> {
        let values: BTreeSet<String> = msgs
            .iter()
            .flat_map(|m| {
                key_sets
                    .iter()
                    .filter_map(|keys| Correlation::from_properties(keys, &m.properties))
            })
            .map(|c| c.canonical())
            .collect();
        self.key_sets.insert(message_type.to_owned(), key_sets);
        values.into_iter().collect()
    }

    /// Whether `msg` may be late for an ended instance ([`common::late`]): its type has a
    /// correlation key set that the message carries. When not, no instance ever waited on its
    /// key, and the late check is skipped (a message of a type nothing correlates on costs no
    /// more than before).
    ///
    /// [`common::late`]: super::common::late
    pub(crate) fn may_be_late(&self, msg: &NewMessage) -> bool {
        self.key_sets.get(&msg.message_type).is_some_and(|sets| {
            sets.iter().any(|keys| {
                !keys.is_empty() && Correlation::from_properties(keys, &msg.properties).is_some()
            })
        })
    }

    /// Records a matching instance subscription; rows must come oldest first (`ORDER BY
    /// created_at, id`), as the first one per correlation is the one routed to.
    pub(crate) fn subscription(
        &mut self,
        message_type: &str,
        correlation: String,
        subscription: Uuid,
        instance: Uuid,
    ) {
        self.subscriptions
            .entry((message_type.to_owned(), correlation))
            .or_insert((subscription, instance));
    }

    /// Records a type's activating subscriptions (none: an empty list), by orchestration name.
    pub(crate) fn activations(&mut self, message_type: &str, rows: Vec<ActivationRow>) {
        let (ports, rows): (Vec<_>, Vec<_>) = rows.into_iter().partition(|a| a.port.is_some());
        self.activations.insert(message_type.to_owned(), rows);
        self.ports.insert(message_type.to_owned(), ports);
    }

    /// The send ports that subscribe to `msg` (its type, and a filter it passes).
    pub(crate) fn ports_for(&self, msg: &NewMessage) -> Vec<String> {
        if msg.target.is_some() {
            return Vec::new();
        }
        self.ports
            .get(&msg.message_type)
            .into_iter()
            .flatten()
            .filter(|a| a.passes(msg))
            .filter_map(|a| a.port.clone())
            .collect()
    }

    /// Every orchestration whose activating subscription `msg` passes (its type, its filter,
    /// and for a convoy every convoy property), by name: publish-subscribe gives each one a copy
    /// but the one its route already goes to ([`common::routing::fan_out`]). Empty for a message
    /// addressed to an instance.
    ///
    /// [`common::routing::fan_out`]: super::common::routing::fan_out
    pub(crate) fn subscribers(&self, msg: &NewMessage) -> Vec<Subscriber> {
        if msg.target.is_some() {
            return Vec::new();
        }
        self.activations
            .get(&msg.message_type)
            .into_iter()
            .flatten()
            .filter(|a| a.passes(msg))
            .filter_map(|a| {
                let (convoy, correlations) = if a.convoy.is_empty() {
                    (None, self.correlations(msg))
                } else {
                    let values = Correlation::from_properties(&a.convoy, &msg.properties)?;
                    let canonical = values.canonical();
                    (Some(values), vec![canonical])
                };
                Some(Subscriber {
                    orchestration: a.orchestration.clone(),
                    version: a.version,
                    convoy,
                    correlations,
                })
            })
            .collect()
    }

    /// The orchestration of the convoy instance that `route` goes to, when routing can tell
    /// without a read: the route's subscription is a convoy's on the message's type
    /// ([`convoy_subscription_id`]), and only one orchestration activates on the type as a
    /// convoy. (A convoy's messages then cost no more to route than before publish-subscribe
    /// looked for other subscribers.)
    ///
    /// [`convoy_subscription_id`]: super::convoy_subscription_id
    pub(crate) fn convoy_of(&self, msg: &NewMessage, route: &Route) -> Option<&str> {
        let Route::Instance(instance, Some(sub)) = route else {
            return None;
        };
        if *sub != super::convoy_subscription_id(*instance, &msg.message_type) {
            return None;
        }
        let mut convoys = self
            .activations
            .get(&msg.message_type)?
            .iter()
            .filter(|a| !a.convoy.is_empty());
        match (convoys.next(), convoys.next()) {
            (Some(only), None) => Some(&only.orchestration),
            _ => None,
        }
    }

    /// The correlations `msg` carries for its type's key sets, in the order routing tries them.
    fn correlations(&self, msg: &NewMessage) -> Vec<String> {
        self.key_sets
            .get(&msg.message_type)
            .into_iter()
            .flatten()
            .filter_map(|keys| Correlation::from_properties(keys, &msg.properties))
            .map(|c| c.canonical())
            .collect()
    }

    /// Where `msg` goes, from the rows recorded.
    pub(crate) fn route(&self, msg: &NewMessage) -> Route {
        self.route_without(msg, &[])
    }

    /// [`route`](Self::route), passing over the activations of the orchestrations in `copied`,
    /// which already have their copy of the message (a message routed again).
    pub(crate) fn route_without(&self, msg: &NewMessage, copied: &[String]) -> Route {
        if let Some(target) = msg.target {
            return Route::Instance(target, None);
        }
        for keys in self.key_sets.get(&msg.message_type).into_iter().flatten() {
            let Some(corr) = Correlation::from_properties(keys, &msg.properties) else {
                continue;
            };
            let key = (msg.message_type.clone(), corr.canonical());
            if let Some((sub, instance)) = self.subscriptions.get(&key) {
                return Route::Instance(*instance, Some(*sub));
            }
        }
        let rows = self.activations.get(&msg.message_type);
        // The first subscriber by name: a convoy's whose message lacks a convoy property is
        // passed over for the next (the reason names it when no other takes the message).
        let mut first = None;
        let taken = |a: &&ActivationRow| !copied.contains(&a.orchestration);
        for a in rows
            .into_iter()
            .flatten()
            .filter(taken)
            .filter(|a| a.passes(msg))
        {
            match activation_route(msg, a.orchestration.clone(), a.version, &a.convoy) {
                route @ Route::Activate { .. } => return route,
                unrouted => {
                    first.get_or_insert(unrouted);
                }
            }
        }
        match (first, rows.filter(|r| !r.is_empty())) {
            (Some(route), _) => route,
            (None, Some(rows)) => filtered_out(msg, rows),
            (None, None) => unrouted(msg),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;

    fn row(orchestration: &str, convoy: &str, filter: &str) -> ActivationRow {
        ActivationRow {
            orchestration: orchestration.into(),
            version: 1,
            convoy: convoy.into(),
            filter: Filter::parse(filter).map_err(|e| e.to_string()),
            port: None,
        }
    }

    #[test]
    fn every_orchestration_a_message_passes_subscribes_and_a_convoy_needs_its_values() {
        let mut cache = RouteCache::default();
        cache.activations(
            "line",
            vec![
                row("a-lines", "order", ""),
                row("audit", "", "audited = 'yes'"),
                row("billing", "", ""),
            ],
        );
        let line = |props: &[(&str, &str)]| {
            let props = props
                .iter()
                .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                .collect();
            NewMessage::published("l", "line", serde_json::json!({}), props)
        };
        let names = |msg: &NewMessage| {
            cache
                .subscribers(msg)
                .into_iter()
                .map(|s| (s.orchestration, s.convoy.map(|c| c.canonical())))
                .collect::<Vec<_>>()
        };
        let full = line(&[("order", "7"), ("audited", "yes")]);
        assert_eq!(
            names(&full),
            [
                ("a-lines".to_owned(), Some("order=7".to_owned())),
                ("audit".to_owned(), None),
                ("billing".to_owned(), None),
            ]
        );
        // No `order`: no convoy copy, and the route passes over the convoy to the next.
        let bare = line(&[]);
        assert_eq!(names(&bare), [("billing".to_owned(), None)]);
        assert!(matches!(
            cache.route(&bare),
            Route::Activate { orchestration, convoy: None, .. } if orchestration == "billing"
        ));
        // A convoy instance's subscription tells its orchestration, the only convoy of the type.
        let instance = Uuid::now_v7();
        let convoy_sub = crate::store::convoy_subscription_id(instance, "line");
        let routed = Route::Instance(instance, Some(convoy_sub));
        assert_eq!(cache.convoy_of(&full, &routed), Some("a-lines"));
        let correlated = Route::Instance(instance, Some(Uuid::now_v7()));
        assert_eq!(cache.convoy_of(&full, &correlated), None);
        // Addressed to an instance: no subscriber.
        let mut addressed = full.clone();
        addressed.target = Some(Uuid::nil());
        assert!(cache.subscribers(&addressed).is_empty());
    }

    #[test]
    fn an_unrouted_reason_never_copies_a_long_value() {
        let mut props: BTreeMap<String, String> = (0..40)
            .map(|i| (format!("k{i:02}"), "v".repeat(10_000)))
            .collect();
        props.insert("short".into(), "s".into());
        let msg = NewMessage::published("m", "é".repeat(1000), serde_json::json!({}), props);
        let Route::Unrouted(reason) = unrouted(&msg) else {
            panic!("unrouted");
        };
        assert!(reason.len() < 4096, "{}", reason.len());
        assert!(reason.contains("(10000 bytes)"), "{reason}");
        assert!(reason.contains("... 25 more"), "{reason}");
        assert_eq!(quote("short"), "short");
    }
}
