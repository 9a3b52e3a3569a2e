//! `isla lab --quick --kinds container` end to end (as root, as in CI): every measurement has a
//! number or a reason, every figure a method, and report.html renders in headless Chromium with
//! every plot in it.

mod common;

use std::path::Path;
use std::process::Command;

use common::*;
use isla_lab::model::key;
use isla_lab::plot::IDS as PLOTS;
use serde_json::Value;

/// A figure is either measured (samples and a summary) or carries a reason.
fn check_figure(who: &str, f: &Value) {
    let method = f["method"].as_str().unwrap_or("");
    assert!(!method.is_empty(), "{who} {}: no method", f["key"]);
    let o = &f["outcome"];
    match o["status"].as_str() {
        Some("measured") => {
            let samples = o["samples"].as_array().unwrap();
            assert!(!samples.is_empty(), "{who} {}: measured without samples", f["key"]);
            assert!(samples.iter().all(|s| s.as_f64().is_some_and(f64::is_finite)), "{who}: {o}");
            assert!(o["summary"]["median"].as_f64().is_some(), "{who}: {o}");
        }
        Some("not_run") | Some("failed") => {
            assert!(!o["reason"].as_str().unwrap_or("").is_empty(), "{who} {}: no reason", f["key"])
        }
        other => panic!("{who} {}: status {other:?}", f["key"]),
    }
}

fn chromium() -> Option<&'static str> {
    ["/usr/bin/chromium", "/usr/bin/chromium-browser"].into_iter().find(|p| Path::new(p).exists())
}

#[test]
fn quick_container_lab_reports_every_measurement_and_renders() {
    let out = tmp("lab-report");
    let _ = std::fs::remove_dir_all(&out);
    let mut cmd = isla();
    cmd.args(["lab", "--quick", "--kinds", "container", "--runs", "2", "--out"]).arg(&out);
    if Path::new("/usr/sbin/runc").exists() {
        cmd.args(["--runc", "/usr/sbin/runc"]);
    }
    let o = cmd.output().unwrap();
    let stdout = String::from_utf8_lossy(&o.stdout);
    assert!(o.status.success(), "{stdout}\n{}", stderr(&o));
    for row in ["Start time", "Base memory", "Isolation", "Density"] {
        assert!(stdout.contains(row), "the seed's table row {row} is missing:\n{stdout}");
    }

    let r: Value = serde_json::from_str(&std::fs::read_to_string(out.join("results.json")).unwrap()).unwrap();
    let subjects = r["subjects"].as_array().unwrap();
    let isla = subjects.iter().find(|s| s["kind"] == "container" && s["peer"] == false).expect("isla's container");
    let iso = &isla["isolation"];
    assert_eq!(iso["status"], "probed", "isolation is measured: {iso}");
    let rows = iso["rows"].as_array().unwrap();
    assert_eq!(rows.len(), 5);
    // Measured from inside: a container shares the host's kernel and nothing else probed.
    for row in rows {
        let shared = row["shared"].as_bool().unwrap();
        assert_eq!(shared, row["dimension"] == "kernel", "{row}");
    }
    for k in key::ALL {
        let f = isla["figures"].as_array().unwrap().iter().find(|f| f["key"] == k);
        check_figure("isla container", f.unwrap_or_else(|| panic!("no {k}")));
    }
    // The start time and base memory of a container are measurable everywhere CI runs.
    for k in [key::START, key::MEMORY, key::DENSITY] {
        let f = isla["figures"].as_array().unwrap().iter().find(|f| f["key"] == k).unwrap();
        assert_eq!(f["outcome"]["status"], "measured", "{f}");
        assert!(f["outcome"]["samples"].as_array().unwrap().len() >= if k == key::START { 2 } else { 1 });
    }
    for f in r["host_baseline"].as_array().unwrap() {
        check_figure("host", f);
    }
    for s in subjects {
        for f in s["figures"].as_array().unwrap() {
            check_figure(s["name"].as_str().unwrap_or("?"), f);
        }
    }

    // report.html: every plot is in the DOM Chromium builds from it.
    let html = out.join("report.html");
    let md = std::fs::read_to_string(out.join("report.md")).unwrap();
    assert!(md.contains("| Start time |") && md.contains("*Method:*"), "{md}");
    let Some(chromium) = chromium() else {
        panic!("chromium is not installed (scripts/setup installs it)");
    };
    let profile = tmp("lab-chromium-profile");
    let dom = Command::new(chromium)
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--no-first-run",
        ])
        .arg(format!("--user-data-dir={}", profile.display()))
        .arg("--dump-dom")
        .arg(format!("file://{}", html.display()))
        .output()
        .unwrap();
    let dom_text = String::from_utf8_lossy(&dom.stdout);
    assert!(dom.status.success(), "chromium: {}", stderr(&dom));
    for id in PLOTS {
        assert!(dom_text.contains(&format!("<svg id=\"{id}\"")), "plot {id} is not in the rendered page");
    }
    assert!(dom_text.contains("isla lab report"));
    let _ = std::fs::remove_dir_all(&profile);
    let _ = std::fs::remove_dir_all(&out);
}
