//! `fieldrack status` and `fieldrack events`: fetch, then render.

use node_agent::client::AgentClient;
use node_agent::state::Event;
use node_agent::status::{render_table, Status};

use super::exit::Failure;

/// Print the field as `client`'s rack sees it.
///
/// # Errors
/// The agent unreachable or refusing.
pub async fn status(client: &AgentClient, json: bool) -> Result<(), Failure> {
    let status = client.status().await?;
    print!("{}", render_status(&status, json)?);
    Ok(())
}

/// Print `client`'s newest `limit` events.
///
/// # Errors
/// The agent unreachable or refusing.
pub async fn events(client: &AgentClient, limit: usize) -> Result<(), Failure> {
    let events = client.events(limit).await?;
    print!("{}", render_events(&events)?);
    Ok(())
}

/// The status document as pretty JSON (scripts parse it), or the table.
///
/// # Errors
/// If it cannot be encoded (not for the types it holds).
pub fn render_status(status: &Status, json: bool) -> serde_json::Result<String> {
    Ok(if json {
        format!("{}\n", serde_json::to_string_pretty(status)?)
    } else {
        format!(
            "{}{}{}\n",
            render_table(status),
            status
                .protected
                .as_ref()
                .map(|t| format!("{}\n", t.render()))
                .unwrap_or_default(),
            node_agent::doctor::readiness_line(status)
        )
    })
}

/// One JSON object per line, keys in alphabetical order, oldest first.
///
/// # Errors
/// If an event cannot be encoded (not for the types it holds).
pub fn render_events(events: &[Event]) -> serde_json::Result<String> {
    let mut out = String::new();
    for e in events {
        // Through `Value`: its keys are sorted, as operators' scripts and
        // the field tests have always read them.
        out.push_str(&serde_json::to_value(e)?.to_string());
        out.push('\n');
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn events_are_one_sorted_json_object_per_line() {
        let events = vec![
            Event {
                seq: 1,
                at_ms: 1_700_000_000_000,
                kind: "peer_state".into(),
                detail: serde_json::json!({ "rack": "b", "state": "alive" }),
            },
            Event {
                seq: 2,
                at_ms: 1_700_000_000_500,
                kind: "failover".into(),
                detail: serde_json::json!({ "appliance": "db", "detected_ms": 1200 }),
            },
        ];
        let out = render_events(&events).unwrap();
        assert_eq!(
            out,
            "{\"at_ms\":1700000000000,\"detail\":{\"rack\":\"b\",\"state\":\"alive\"},\"kind\":\"peer_state\",\"seq\":1}\n\
             {\"at_ms\":1700000000500,\"detail\":{\"appliance\":\"db\",\"detected_ms\":1200},\"kind\":\"failover\",\"seq\":2}\n"
        );
        let back: Vec<Event> = out
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        assert_eq!(back, events);
        assert_eq!(render_events(&[]).unwrap(), "");
    }
}
