//! `isla compose` end to end, as root: real containers of the built-in busybox image in a
//! network namespace each test makes (isla joins it with `nsenter --net`), a private state root
//! per test, unique project names. Everything is removed on drop, also after a failure.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

struct Stack {
    ns: String,
    root: PathBuf,
    dir: PathBuf,
}

impl Stack {
    fn new(tag: &str) -> Stack {
        let ns = format!("islacp{tag}{}", std::process::id());
        common::fresh_netns(&ns);
        let root = common::tmp(&format!("compose-{tag}"));
        let dir = common::tmp(&format!("compose-{tag}-files"));
        let _ = std::fs::remove_dir_all(&root);
        std::fs::create_dir_all(&dir).unwrap();
        Stack { ns, root, dir }
    }

    fn netns(&self) -> String {
        format!("--net=/run/netns/{}", self.ns)
    }

    /// `isla ARGS --root ROOT` inside the namespace (ARGS[0] is the subcommand).
    fn isla(&self, args: &[&str]) -> Output {
        self.isla_env(args, &[])
    }

    /// [`Stack::isla`] with these environment variables set.
    fn isla_env(&self, args: &[&str], env: &[(&str, &str)]) -> Output {
        self.command(args).envs(env.iter().copied()).output().unwrap()
    }

    /// The command [`Stack::isla`] runs.
    fn command(&self, args: &[&str]) -> Command {
        let mut c = Command::new("nsenter");
        c.arg(self.netns()).arg(env!("CARGO_BIN_EXE_isla")).arg(args[0]).arg("--root").arg(&self.root);
        c.args(&args[1..]);
        c
    }

    fn ok(&self, args: &[&str]) -> String {
        common::expect_ok(args, self.isla(args))
    }

    fn fails(&self, args: &[&str]) -> String {
        common::expect_failure(args, self.isla(args))
    }

    fn sh(&self, cmd: &str) -> String {
        let o = Command::new("nsenter").args([self.netns().as_str(), "sh", "-c", cmd]).output().unwrap();
        String::from_utf8_lossy(&o.stdout).into_owned()
    }

    /// Writes a stack file in this test's directory.
    fn file(&self, name: &str, text: &str) -> String {
        let p = self.dir.join(name);
        std::fs::write(&p, text).unwrap();
        p.display().to_string()
    }

    fn json(&self, args: &[&str]) -> Vec<serde_json::Value> {
        serde_json::from_str::<serde_json::Value>(&self.ok(args)).unwrap().as_array().unwrap().clone()
    }

    /// Instances, networks, links and DNAT rules left in this root and namespace.
    fn leftovers(&self) -> Vec<String> {
        let mut out: Vec<String> = Vec::new();
        out.extend(
            self.json(&["ps", "-a", "--output", "json"]).iter().map(|i| format!("instance {}", i["spec"]["name"])),
        );
        out.extend(self.json(&["network", "ls", "--output", "json"]).iter().map(|n| format!("network {}", n["name"])));
        out.extend(self.json(&["volume", "ls", "--output", "json"]).iter().map(|v| format!("volume {}", v["name"])));
        let links = self.sh("ip -o link");
        out.extend(links.lines().filter(|l| l.contains("isla-")).map(|l| format!("link {l}")));
        let rules = self.sh("nft list ruleset");
        out.extend(rules.lines().filter(|l| l.contains("dnat to")).map(|l| format!("rule {}", l.trim())));
        out
    }
}

impl Drop for Stack {
    fn drop(&mut self) {
        // Inside the namespace: removing instances releases their links and rules there.
        let o = self.isla(&["ps", "-aq"]);
        for id in String::from_utf8_lossy(&o.stdout).split_whitespace() {
            let _ = self.isla(&["rm", "-f", id]);
        }
        let _ = Command::new("ip").args(["netns", "del", &self.ns]).status();
        let _ = std::fs::remove_dir_all(&self.root);
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn seed_004() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../examples/seed-004/compose.yaml")
}

#[test]
fn seed_004_stack_serves_five_pages_and_down_leaves_nothing() {
    let st = Stack::new("seed");
    let file = seed_004().display().to_string();
    let project = format!("seed{}", std::process::id());
    let c = |cmd: &[&'static str]| [&["compose", "-f", file.as_str(), "-p", project.as_str()], cmd].concat();
    st.ok(&c(&["up", "-d"]));
    let page = std::fs::read_to_string(seed_004().with_file_name("html").join("index.html")).unwrap();
    for port in 8080..=8084 {
        let got = st.sh(&format!("busybox wget -q -O - http://127.0.0.1:{port}/"));
        assert_eq!(got, page, "port {port}");
    }
    let ps = st.json(&c(&["ps", "--output", "json"]));
    let names: Vec<&str> = ps.iter().map(|i| i["spec"]["name"].as_str().unwrap()).collect();
    assert_eq!(names, ["web", "web2", "web3", "web4", "web5"]);
    assert!(ps.iter().all(|i| i["status"]["state"] == "running"), "{ps:?}");
    let table = st.ok(&c(&["ps"]));
    assert!(table.contains("0.0.0.0:8084->80/tcp"), "{table}");
    // A second `up` finds everything running and changes nothing.
    assert_eq!(st.ok(&c(&["up", "-d"])).matches("running").count(), 5);
    st.ok(&c(&["down", "-t", "1"]));
    assert_eq!(st.leftovers(), Vec::<String>::new());
}

#[test]
fn dependencies_environment_and_logs() {
    let st = Stack::new("deps");
    let f = st.file(
        "deps.yaml",
        r#"
services:
  app:
    image: busybox
    command: ["sh", "-c", "echo app started; sleep 1000"]
    depends_on: {db: {condition: service_started}}
    networks: [back]
  db:
    image: busybox
    entrypoint: sh -c
    command: ["env | grep GREETING; sleep 1000"]
    environment: {GREETING: hello from db}
    deploy: {resources: {limits: {memory: 32m, cpus: 0.5}}}
    networks: [back]
networks:
  back: {}
"#,
    );
    let c = |cmd: &[&'static str]| [&["compose", "-f", f.as_str(), "-p", "deps"], cmd].concat();
    let up = st.ok(&c(&["up", "-d"]));
    assert_eq!(
        up.lines().collect::<Vec<_>>(),
        ["network deps_back created", "deps-db-1 started", "deps-app-1 started"]
    );
    let logs = (0..50)
        .map(|_| {
            std::thread::sleep(std::time::Duration::from_millis(100));
            st.ok(&c(&["logs"]))
        })
        .find(|l| l.lines().count() >= 2)
        .unwrap_or_default();
    assert!(logs.contains("deps-db-1  | GREETING=hello from db"), "{logs}");
    assert!(logs.contains("deps-app-1 | app started"), "{logs}");
    assert!(!st.ok(&c(&["logs", "app"])).contains("GREETING"));
    let err = st.fails(&c(&["logs", "nope"]));
    assert!(err.contains("no service `nope`"), "{err}");
    let db = st.json(&["inspect", "deps-db-1"]);
    assert_eq!(db[0]["spec"]["memory"], 32 << 20);
    assert_eq!(db[0]["spec"]["network"], "deps_back");
    st.ok(&c(&["down", "-t", "1"]));
    assert_eq!(st.leftovers(), Vec::<String>::new());
}

#[test]
fn bad_stack_files_are_refused_and_create_nothing() {
    let st = Stack::new("bad");
    let cases = [
        ("malformed.yaml", "services:\n  web:\n    image: \"busybox\n", &["line 3", "column"][..]),
        (
            "unknown.yaml",
            "services:\n  web:\n    image: busybox\n    healthcheck: {test: true}\n",
            &["unknown field `healthcheck`", "line 4", "services.web"][..],
        ),
        (
            "port.yaml",
            "services:\n  web:\n    image: busybox\n    ports: [\"80:x\"]\n",
            &["services.web.ports: port `80:x`", "line 4"][..],
        ),
        (
            "interp.yaml",
            "services:\n  web:\n    image: busybox\n    command: echo ${NOPE:?set NOPE in .env}\n",
            &["services.web.command", "required variable NOPE is missing a value: set NOPE in .env", "line 4"][..],
        ),
        (
            "dollar.yaml",
            "services:\n  web:\n    image: busybox\n    environment:\n      PRICE: 5$\n",
            &["services.web.environment.PRICE", "`$$`", "line 5"][..],
        ),
        (
            "cycle.yaml",
            "services:\n  a: {image: busybox, depends_on: [b]}\n  b: {image: busybox, depends_on: [a]}\n",
            &["cycle: a -> b -> a"][..],
        ),
    ];
    for (name, text, want) in cases {
        let f = st.file(name, text);
        let err = st.fails(&["compose", "-f", &f, "-p", "bad", "up", "-d"]);
        for w in want {
            assert!(err.contains(w) && err.contains(name), "{name}: want {w}: {err}");
        }
    }
    // A failure half way: the first service was started, the second cannot be made; the
    // first instance and the network and volume made for it are removed again.
    let f = st.file(
        "half.yaml",
        "services:\n  web: {image: busybox, command: httpd -f -p 80, ports: [\"8090:80\"], volumes: [\"v:/v\"]}\n  bad: {image: nosuchimage, depends_on: [web]}\nvolumes: {v: }\n",
    );
    let err = st.fails(&["compose", "-f", &f, "-p", "bad", "up", "-d"]);
    assert!(err.contains("nosuchimage") && err.contains("nothing of this `up` was kept"), "{err}");
    assert_eq!(st.leftovers(), Vec::<String>::new());
}

#[test]
fn build_named_volume_and_interpolation() {
    let st = Stack::new("build");
    std::fs::create_dir_all(st.dir.join("app")).unwrap();
    st.file("app/Containerfile", "FROM busybox\nARG GREETING=hi\nRUN echo \"$GREETING from the build\" > /greeting\n");
    st.file(".env", "# read for ${...}\nGREETING=hello\nSUFFIX=env-file\n");
    let f = st.file(
        "compose.yaml",
        r#"
services:
  app:
    build:
      context: ./app
      args: {GREETING: "${GREETING}"}
    command: ["sh", "-c", "cat /greeting; echo ${SUFFIX:-unset} '$$'literal; cat /data/count 2>/dev/null; echo x >> /data/count; exec sleep 1000"]
    volumes: ["data:/data"]
    environment: {FROM_SHELL: "${ISLA_TEST_SHELL:?must be set}", DEFAULTED: "${ISLA_TEST_UNSET-fallback}"}
volumes:
  data:
"#,
    );
    let shell = [("ISLA_TEST_SHELL", "from-shell")];
    let c = |cmd: &[&'static str]| [&["compose", "-f", f.as_str(), "-p", "bld"], cmd].concat();
    // Every command reads the file, so every one needs the variable.
    let ok = |cmd: &[&'static str]| common::expect_ok(&c(cmd), st.isla_env(&c(cmd), &shell));
    // Logs of the service once `n` lines are there.
    let logs = |n: usize| {
        (0..100)
            .map(|_| {
                std::thread::sleep(std::time::Duration::from_millis(100));
                ok(&["logs"])
            })
            .find(|l| l.lines().count() >= n)
            .unwrap_or_default()
    };

    let out = ok(&["up", "-d"]);
    assert!(out.contains("service app: building bld-app") && out.contains("volume bld_data created"), "{out}");
    assert_eq!(logs(2), "bld-app-1 | hello from the build\nbld-app-1 | env-file $literal\n");
    let env = st.ok(&["exec", "bld-app-1", "env"]);
    assert!(env.contains("FROM_SHELL=from-shell") && env.contains("DEFAULTED=fallback"), "{env}");
    let img = st.json(&["inspect", "bld-app-1"]);
    assert_eq!(img[0]["spec"]["image"], "bld-app");

    // `down` keeps the volume; the next `up` neither builds nor loses the data.
    ok(&["down", "-t", "0"]);
    assert_eq!(st.leftovers(), ["volume \"bld_data\""]);
    let out = ok(&["up", "-d"]);
    assert!(!out.contains("building"), "{out}");
    assert!(logs(3).ends_with("bld-app-1 | x\n"), "the volume lost its file");

    // Without the required variable: the error names the field and the line, nothing runs.
    let err = st.fails(&c(&["up", "-d"]));
    assert!(err.contains("services.app.environment.FROM_SHELL") && err.contains("line 9"), "{err}");
    // A new build argument from .env: `up --build` rebuilds and recreates the service.
    st.file(".env", "GREETING=bonjour\n");
    let out = ok(&["up", "-d", "--build"]);
    assert!(out.contains("building") && out.contains("bld-app-1 started"), "{out}");
    let want = "bld-app-1 | bonjour from the build\nbld-app-1 | unset $literal\nbld-app-1 | x\nbld-app-1 | x\n";
    assert_eq!(logs(4), want);

    // `logs --follow` follows until the project's instances are gone; `down -v` removes the volume too.
    let follow =
        st.command(&c(&["logs", "--follow"])).envs(shell).stdout(std::process::Stdio::piped()).spawn().unwrap();
    std::thread::sleep(std::time::Duration::from_millis(500));
    let out = ok(&["down", "-v", "-t", "0"]);
    assert!(out.contains("volume bld_data removed"), "{out}");
    let followed = follow.wait_with_output().unwrap();
    assert!(followed.status.success(), "{followed:?}");
    assert_eq!(String::from_utf8_lossy(&followed.stdout), want);
    assert_eq!(st.leftovers(), Vec::<String>::new());
}
