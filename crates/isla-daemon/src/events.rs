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
#[derive(PartialEq)]
struct Seen {
    name: String,
    status: String,
}

fn event(kind: &str, id: &str, name: &str, inst: Option<&Instance>) -> String {
    let mut v = json!({
        "time": isla_core::proc::now_rfc3339(),
        "type": kind,
        "id": id,
        "name": name,
    });
    if let Some(i) = inst {
        v["status"] = json!(i.status.to_string());
        v["exit_code"] = json!(i.exit_code);
        v["kind"] = json!(i.spec.kind.as_str());
    }
    v.to_string()
}

/// Compares two snapshots: the event lines, oldest state first.
fn diff(old: &BTreeMap<String, Seen>, now: &[Instance]) -> Vec<String> {
    let mut out = Vec::new();
    for i in now {
        let status = i.status.to_string();
        match old.get(&i.id) {
            None => out.push(event("created", &i.id, &i.spec.name, Some(i))),
            Some(s) if s.status != status => out.push(event("status", &i.id, &i.spec.name, Some(i))),
            Some(_) => {}
        }
    }
    for (id, s) in old {
        if !now.iter().any(|i| &i.id == id) {
            out.push(event("removed", id, &s.name, None));
        }
    }
    out
}

fn snapshot(now: &[Instance]) -> BTreeMap<String, Seen> {
    now.iter().map(|i| (i.id.clone(), Seen { name: i.spec.name.clone(), status: i.status.to_string() })).collect()
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
                        if let Some(old) = &seen {
                            for line in diff(old, &now) {
                                // No subscriber is fine.
                                let _ = tx.send(line);
                            }
                        }
                        seen = Some(snapshot(&now));
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
        let mut a = Instance {
            id: "a1".into(),
            spec: isla_core::InstanceSpec::container("web", "busybox"),
            status: isla_core::Status::Created,
            exit_code: None,
            pid: None,
            pid_start: None,
            supervisor_pid: None,
            created: String::new(),
            started: None,
            finished: None,
            restart_count: 0,
            attachment: None,
            error: None,
            log_path: PathBuf::new(),
        };
        let none = BTreeMap::new();
        let ev = diff(&none, std::slice::from_ref(&a));
        assert_eq!(ev.len(), 1);
        assert!(ev[0].contains(r#""type":"created""#) && ev[0].contains(r#""name":"web""#), "{ev:?}");
        let old = snapshot(std::slice::from_ref(&a));
        assert!(diff(&old, std::slice::from_ref(&a)).is_empty());
        a.status = isla_core::Status::Exited(3);
        let ev = diff(&old, std::slice::from_ref(&a));
        assert!(ev[0].contains(r#""status":"exited (3)""#) && ev[0].contains(r#""exit_code":null"#), "{ev:?}");
        let ev = diff(&old, &[]);
        assert!(ev[0].contains(r#""type":"removed""#) && ev[0].contains(r#""id":"a1""#), "{ev:?}");
    }
}
