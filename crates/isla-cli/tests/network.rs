//! `isla network` end to end. The binary runs inside a network namespace this test creates
//! (`ip netns exec`), so its bridges and rules never touch the machine's own namespace.

mod common;

use std::process::{Command, Output};

struct Ns(String);

impl Ns {
    fn new() -> Self {
        let name = format!("islacli{}", std::process::id());
        assert!(Command::new("ip").args(["netns", "add", &name]).status().unwrap().success());
        Ns(name)
    }
    fn isla(&self, root: &std::path::Path, args: &[&str]) -> Output {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.0, env!("CARGO_BIN_EXE_isla"), "network", "--root"]).arg(root).args(args);
        c.output().unwrap()
    }
    fn out(&self, what: &[&str]) -> String {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.0]).args(what);
        String::from_utf8_lossy(&c.output().unwrap().stdout).into_owned()
    }
}

impl Drop for Ns {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.0]).status();
    }
}

fn ok(o: &Output) -> String {
    assert!(o.status.success(), "{}", common::stderr(o));
    String::from_utf8_lossy(&o.stdout).into_owned()
}

#[test]
fn network_create_ls_inspect_rm_prune() {
    let ns = Ns::new();
    let root = common::tmp("netroot");
    let created = ok(&ns.isla(&root, &["create", "front"]));
    assert!(created.starts_with("front nat 10.88.0.0/24 isla-br-"), "{created}");
    ok(&ns.isla(&root, &["create", "back", "--driver", "host-only", "--subnet", "10.90.0.0/24"]));

    let clash = ns.isla(&root, &["create", "front", "--driver", "bridge"]);
    assert_eq!(clash.status.code(), Some(1));
    assert!(common::stderr(&clash).contains("network `front` already exists"), "{}", common::stderr(&clash));
    let bad = ns.isla(&root, &["create", "x", "--subnet", "10.90.0.0/16"]);
    assert!(common::stderr(&bad).contains("overlaps network `back`"), "{}", common::stderr(&bad));

    let list: serde_json::Value = serde_json::from_str(&ok(&ns.isla(&root, &["ls", "--output", "json"]))).unwrap();
    let names: Vec<&str> = list.as_array().unwrap().iter().map(|n| n["name"].as_str().unwrap()).collect();
    assert_eq!(names, ["back", "front"]);
    assert_eq!(list[0]["driver"], "host-only");
    assert!(ok(&ns.isla(&root, &["ls"])).contains("front                nat        10.88.0.0/24"));
    let inspect: serde_json::Value = serde_json::from_str(&ok(&ns.isla(&root, &["inspect", "front"]))).unwrap();
    assert_eq!(inspect[0]["gateway"], "10.88.0.1");
    let bridge = inspect[0]["bridge"].as_str().unwrap().to_string();
    assert!(ns.out(&["ip", "-o", "addr", "show", &bridge]).contains("10.88.0.1/24"));
    assert!(ns.out(&["nft", "list", "table", "ip", "isla-nat"]).contains("masquerade"));

    let rm = ns.isla(&root, &["rm", "front", "nosuch"]);
    assert_eq!(rm.status.code(), Some(1));
    assert!(common::stderr(&rm).contains("no network named `nosuch`"));
    // A leftover of a crash: prune deletes it, and the unused network.
    assert!(Command::new("ip")
        .args(["-n", &ns.0, "link", "add", "isla-tleft", "type", "bridge"])
        .status()
        .unwrap()
        .success());
    let pruned = ok(&ns.isla(&root, &["prune"]));
    assert_eq!(pruned, "network back\nlink isla-tleft\n");
    assert_eq!(ok(&ns.isla(&root, &["ls", "--output", "json"])).trim(), "[]");
    assert!(!ns.out(&["ip", "-o", "link"]).contains("isla-"));
    assert!(!ns.out(&["nft", "list", "tables"]).contains("isla"));
}
