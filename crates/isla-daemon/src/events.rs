//! The event stream: a thread reads the store every poll interval (after the manager's crash
//! repair, so a supervisor that died shows up as `dead`) and broadcasts one JSON line per
//! change: `created`, `status` (a new status), `removed`. Polling sees every change that lasts
//! longer than the interval; the store has no change feed, and the CLI changes it from other
//! processes, so a notification inside the daemon would miss those.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use isla_core::{Instance, Manager};
use serde_json::json;
use tokio::sync::{broadcast, watch};

/// What the poller remembers of an instance.
#[derive(Debug, Clone, PartialEq)]
struct Seen {
    name: String,
    status: String,
    exit_code: Option<i32>,
    kind: &'static str,
}

fn event(kind: &str, id: &str, s: &Seen) -> String {
    let mut v = json!({
        "time": isla_core::proc::now_rfc3339(),
        "type": kind,
        "id": id,
        "name": s.name,
    });
    if kind != "removed" {
        v["status"] = json!(s.status);
        v["exit_code"] = json!(s.exit_code);
        v["kind"] = json!(s.kind);
    }
    v.to_string()
}

/// Compares two snapshots: the event lines.
fn diff(old: &BTreeMap<String, Seen>, now: &BTreeMap<String, Seen>) -> Vec<String> {
    let mut out = Vec::new();
    for (id, s) in now {
        match old.get(id) {
            None => out.push(event("created", id, s)),
            Some(o) if o.status != s.status => out.push(event("status", id, s)),
            Some(_) => {}
        }
    }
    for (id, s) in old {
        if !now.contains_key(id) {
            out.push(event("removed", id, s));
        }
    }
    out
}

fn snapshot(now: &[Instance]) -> BTreeMap<String, Seen> {
    now.iter()
        .map(|i| {
            let s = Seen {
                name: i.spec.name.clone(),
                status: i.status.to_string(),
                exit_code: i.exit_code,
                kind: i.spec.kind.as_str(),
            };
            (i.id.clone(), s)
        })
        .collect()
}

/// Starts the poller thread; it ends at shutdown.
pub fn spawn_poller(
    root: PathBuf,
    helper: PathBuf,
    every: Duration,
    tx: broadcast::Sender<String>,
    stop: watch::Receiver<bool>,
) {
    std::thread::spawn(move || {
        let mut seen: Option<BTreeMap<String, Seen>> = None;
        let mut m: Option<Manager> = None;
        while !*stop.borrow() {
            if m.is_none() {
                m = Manager::open_with_helper(&root, helper.clone())
                    .map_err(|e| tracing::warn!("events: opening the store: {e}"))
                    .ok();
            }
            if let Some(mgr) = &m {
                if let Err(e) = mgr.reconcile() {
                    tracing::warn!("events: repair: {e}");
                }
                match mgr.list(true) {
                    Ok(now) => {
                        let now = snapshot(&now);
                        if let Some(old) = &seen {
                            for line in diff(old, &now) {
                                // No subscriber is fine.
                                let _ = tx.send(line);
                            }
                        }
                        seen = Some(now);
                    }
                    Err(e) => {
                        tracing::warn!("events: reading the store: {e}");
                        m = None;
                    }
                }
            }
            std::thread::sleep(every);
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn diff_reports_new_changed_and_gone_instances() {
        let web =
            |status: &str, exit_code| Seen { name: "web".into(), status: status.into(), exit_code, kind: "container" };
        let none = BTreeMap::new();
        let one = |s: Seen| BTreeMap::from([("a1".to_string(), s)]);
        let ev = diff(&none, &one(web("running", None)));
        assert_eq!(ev.len(), 1);
        assert!(ev[0].contains(r#""type":"created""#) && ev[0].contains(r#""name":"web""#), "{ev:?}");
        assert!(diff(&one(web("running", None)), &one(web("running", None))).is_empty());
        let ev = diff(&one(web("running", None)), &one(web("exited (3)", Some(3))));
        assert!(ev[0].contains(r#""status":"exited (3)""#) && ev[0].contains(r#""exit_code":3"#), "{ev:?}");
        let ev = diff(&one(web("running", None)), &none);
        assert!(ev[0].contains(r#""type":"removed""#) && ev[0].contains(r#""id":"a1""#), "{ev:?}");
    }
}
