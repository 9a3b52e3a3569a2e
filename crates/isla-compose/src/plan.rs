//! From a [`ComposeFile`] to a [`Plan`]: project and instance names, networks, volumes resolved
//! against the file's directory, and the services in start order.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use isla_core::{model, InstanceSpec, Kind, Volume};
use isla_net::{Driver, NetworkSpec};

use crate::file::{ComposeFile, NetworkDef, Service, VolumeDef};
use crate::interpolate::{with_vars, Vars};
use crate::{Error, Result};

/// Label holding the project an instance belongs to.
pub const LABEL_PROJECT: &str = "isla.compose.project";
/// Label holding the service an instance runs.
pub const LABEL_SERVICE: &str = "isla.compose.service";
/// Label holding the key a project volume has in the file.
pub const LABEL_VOLUME: &str = "isla.compose.volume";

/// What `up` makes and `down` removes.
#[derive(Debug, Clone)]
pub struct Plan {
    /// Project name.
    pub project: String,
    /// Networks the services use, in name order.
    pub networks: Vec<PlannedNetwork>,
    /// Named volumes of the project, in key order.
    pub volumes: Vec<PlannedVolume>,
    /// Services in start order (dependencies first).
    pub services: Vec<PlannedService>,
    /// Things to tell the user that do not stop the plan (unset variables).
    pub warnings: Vec<String>,
}

/// One named volume of the project.
#[derive(Debug, Clone, PartialEq)]
pub struct PlannedVolume {
    /// Key in the file.
    pub key: String,
    /// The isla volume (`<project>_<key>` unless named or external).
    pub name: String,
    /// Made by someone else: `up` requires it, `down -v` leaves it.
    pub external: bool,
    /// Labels, with the project's and the key's.
    pub labels: BTreeMap<String, String>,
}

/// How a service's image is built (`build:`).
#[derive(Debug, Clone, PartialEq)]
pub struct PlannedBuild {
    /// The context directory.
    pub context: PathBuf,
    /// The Containerfile (None: `Containerfile`, else `Dockerfile`, in the context).
    pub file: Option<PathBuf>,
    /// `ARG` values.
    pub args: BTreeMap<String, String>,
}

/// One network of the project.
#[derive(Debug, Clone)]
pub struct PlannedNetwork {
    /// Key in the file (`default` for the implicit one).
    pub key: String,
    /// The isla network.
    pub spec: NetworkSpec,
    /// Made by someone else: `up` requires it, `down` leaves it.
    pub external: bool,
}

/// One service and the instance that runs it.
#[derive(Debug, Clone)]
pub struct PlannedService {
    /// Service name.
    pub service: String,
    /// The instance (its labels name the project and the service).
    pub spec: InstanceSpec,
    /// Build the image (named `spec.image`) first.
    pub build: Option<PlannedBuild>,
}

/// Docker's project name rule: lowercase letters, digits, `-` and `_`, starting with a letter
/// or digit. Other characters of a directory name are dropped.
pub fn project_name(raw: &str) -> String {
    let s: String =
        raw.to_ascii_lowercase().chars().filter(|c| c.is_ascii_alphanumeric() || *c == '-' || *c == '_').collect();
    s.trim_start_matches(['-', '_']).to_string()
}

/// Reads `path` and plans it, with the caller's environment and the `.env` file beside it as
/// variables. The project is `project`, else the file's `name:`, else the name of the file's
/// directory.
pub fn load(path: &Path, project: Option<&str>) -> Result<Plan> {
    let file = path.display().to_string();
    let text = std::fs::read_to_string(path).map_err(|source| Error::Read { file: file.clone(), source })?;
    let abs = std::path::absolute(path).map_err(|source| Error::Read { file: file.clone(), source })?;
    let dir = abs.parent().map(Path::to_path_buf).unwrap_or_else(|| PathBuf::from("/"));
    let vars = Vars::for_dir(&dir)?;
    let (parsed, unset) = parse_with(&file, &text, &vars)?;
    let project = match (project, &parsed.name) {
        (Some(p), _) => p.to_string(),
        (None, Some(n)) => n.clone(),
        (None, None) => dir.file_name().map(|n| project_name(&n.to_string_lossy())).unwrap_or_default(),
    };
    let mut p = plan(&file, &parsed, &dir, &project, &vars)?;
    p.warnings = unset.iter().map(|v| format!("the variable {v} is not set; an empty string is used")).collect();
    Ok(p)
}

/// Parses the text of a stack file named `file` (for messages), interpolating nothing but `$$`
/// (no variable is set).
pub fn parse(file: &str, text: &str) -> Result<ComposeFile> {
    parse_with(file, text, &Vars::default()).map(|(f, _)| f)
}

/// Parses the text of a stack file, interpolating `${VAR}` with `vars`; also returns the
/// variables that were used but not set.
pub fn parse_with(file: &str, text: &str, vars: &Vars) -> Result<(ComposeFile, Vec<String>)> {
    let (parsed, unset) = with_vars(vars, || serde_yaml::from_str(text));
    let parsed = parsed.map_err(|e: serde_yaml::Error| {
        let loc = e.location();
        Error::Syntax {
            file: file.to_string(),
            msg: e.to_string(),
            line: loc.as_ref().map(|l| l.line()),
            column: loc.as_ref().map(|l| l.column()),
        }
    })?;
    Ok((parsed, unset))
}

/// Plans a parsed file: `dir` is the file's directory (relative host paths are read against
/// it), `vars` give the values of bare `environment:` keys. Nothing on the system is looked at
/// or changed.
pub fn plan(file: &str, f: &ComposeFile, dir: &Path, project: &str, vars: &Vars) -> Result<Plan> {
    let invalid = |field: String, msg: String| Error::Invalid { file: file.to_string(), field, msg };
    if project.is_empty() || project != project_name(project) {
        return Err(invalid(
            "project name".into(),
            format!("`{project}`: use lowercase letters, digits, `-` and `_`, starting with a letter or digit (-p)"),
        ));
    }
    if f.services.is_empty() {
        return Err(invalid("services".into(), "the file defines no service".into()));
    }
    let mut volumes = BTreeMap::new();
    for (key, def) in &f.volumes {
        let v = plan_volume(project, key, def.as_ref()).map_err(|m| invalid(format!("volumes.{key}"), m))?;
        volumes.insert(key.clone(), v);
    }
    let mut networks: BTreeMap<String, PlannedNetwork> = BTreeMap::new();
    let mut services = BTreeMap::new();
    for (name, svc) in &f.services {
        let field = |f: &str| format!("services.{name}.{f}");
        let net_key = match svc.networks.0.as_slice() {
            [] => "default".to_string(),
            [one] => one.clone(),
            _ => return Err(invalid(field("networks"), "isla attaches an instance to one network; keep one".into())),
        };
        if !networks.contains_key(&net_key) {
            let def = match f.networks.get(&net_key) {
                Some(d) => d.as_ref(),
                None if net_key == "default" => None,
                None => {
                    return Err(invalid(
                        field("networks"),
                        format!("network `{net_key}` is not defined under the top-level `networks:`"),
                    ))
                }
            };
            let n = plan_network(project, &net_key, def).map_err(|m| invalid(format!("networks.{net_key}"), m))?;
            networks.insert(net_key.clone(), n);
        }
        let ctx = Ctx { project, dir, network: &networks[&net_key].spec.name, volumes: &volumes, vars };
        let planned = plan_service(&ctx, name, svc).map_err(|(f, m)| invalid(field(f), m))?;
        for d in &svc.depends_on.0 {
            if !f.services.contains_key(d) {
                return Err(invalid(field("depends_on"), format!("there is no service `{d}` in the file")));
            }
        }
        services.insert(name.clone(), planned);
    }
    let mut seen = BTreeSet::new();
    for s in services.values() {
        if !seen.insert(&s.spec.name) {
            return Err(invalid("container_name".into(), format!("two services are named `{}`", s.spec.name)));
        }
    }
    let order = start_order(f).map_err(|cycle| Error::Cycle { file: file.to_string(), cycle })?;
    let services = order.into_iter().filter_map(|s| services.remove(&s)).collect();
    Ok(Plan {
        project: project.to_string(),
        networks: networks.into_values().collect(),
        volumes: volumes.into_values().collect(),
        services,
        warnings: Vec::new(),
    })
}

fn plan_volume(project: &str, key: &str, def: Option<&VolumeDef>) -> std::result::Result<PlannedVolume, String> {
    let none = VolumeDef::default();
    let def = def.unwrap_or(&none);
    if let Some(d) = def.driver.as_deref().filter(|d| *d != "local") {
        return Err(format!("driver `{d}` is not supported; isla volumes are local directories"));
    }
    let name = match (&def.name, def.external) {
        (Some(n), _) => n.clone(),
        (None, true) => key.to_string(),
        (None, false) => format!("{project}_{key}"),
    };
    model::check_volume_name(&name).map_err(|e| e.to_string())?;
    let mut labels: BTreeMap<String, String> =
        def.labels.0.iter().map(|(k, v)| (k.clone(), v.clone().unwrap_or_default())).collect();
    labels.insert(LABEL_PROJECT.into(), project.into());
    labels.insert(LABEL_VOLUME.into(), key.into());
    Ok(PlannedVolume { key: key.to_string(), name, external: def.external, labels })
}

fn plan_network(project: &str, key: &str, def: Option<&NetworkDef>) -> std::result::Result<PlannedNetwork, String> {
    let none = NetworkDef::default();
    let def = def.unwrap_or(&none);
    let driver = match (def.driver.as_deref(), def.internal) {
        (None | Some("bridge" | "nat"), false) => Driver::Nat,
        (None | Some("bridge" | "nat" | "host-only"), true) | (Some("host-only"), false) => Driver::HostOnly,
        (Some(d), _) => return Err(format!("driver `{d}` is not supported; use bridge (NAT) or host-only")),
    };
    let name = match (&def.name, def.external) {
        (Some(n), _) => n.clone(),
        (None, true) => key.to_string(),
        (None, false) => format!("{project}_{key}"),
    };
    Ok(PlannedNetwork { key: key.to_string(), spec: NetworkSpec::new(name, driver), external: def.external })
}

/// What every service of a plan shares.
struct Ctx<'a> {
    project: &'a str,
    dir: &'a Path,
    network: &'a str,
    volumes: &'a BTreeMap<String, PlannedVolume>,
    vars: &'a Vars,
}

/// The instance of one service; errors are (field, message).
fn plan_service(c: &Ctx<'_>, name: &str, svc: &Service) -> std::result::Result<PlannedService, (&'static str, String)> {
    let kind = svc.kind.unwrap_or(Kind::Container);
    let image = match (&svc.image, &svc.build) {
        (Some(i), _) => i.clone(),
        (None, Some(_)) => format!("{}-{name}", c.project),
        (None, None) => return Err(("image", "every service needs an image or a build".into())),
    };
    let build = match &svc.build {
        Some(_) if kind != Kind::Container => {
            return Err(("build", format!("only containers are built from a Containerfile, not kind {kind}")))
        }
        Some(b) => {
            let context = normalize(&c.dir.join(b.context.as_deref().unwrap_or(".")));
            let file = b.dockerfile.as_ref().map(|f| normalize(&context.join(f)));
            Some(PlannedBuild { context, file, args: resolve_env(&b.args.0, c.vars).into_iter().collect() })
        }
        None => None,
    };
    if kind != Kind::Container && !svc.volumes.is_empty() {
        return Err((
            "volumes",
            format!(
                "a {kind} takes no volumes: host folders and named volumes are not shared into guests (no virtio-fs)"
            ),
        ));
    }
    let instance = svc.container_name.clone().unwrap_or_else(|| format!("{}-{name}-1", c.project));
    model::check_name(&instance).map_err(|e| ("container_name", e.to_string()))?;
    let mut s = InstanceSpec::container(instance, image);
    s.kind = kind;
    s.command = svc.entrypoint.iter().chain(&svc.command).flat_map(|w| w.0.iter().cloned()).collect();
    s.env = resolve_env(&svc.environment.0, c.vars).into_iter().map(|(k, v)| format!("{k}={v}")).collect();
    s.workdir = svc.working_dir.clone();
    s.ports = svc.ports.iter().map(|p| p.0).collect();
    for v in &svc.volumes {
        s.volumes.push(if v.named {
            let planned = c.volumes.get(&v.host).ok_or_else(|| {
                ("volumes", format!("volume `{}` is not defined under the top-level `volumes:`", v.host))
            })?;
            Volume::named(planned.name.clone(), v.guest.clone(), v.readonly)
        } else {
            Volume::bind(normalize(&c.dir.join(&v.host)), v.guest.clone(), v.readonly)
        });
    }
    let limits = svc.deploy.as_ref().and_then(|d| d.resources.as_ref()).and_then(|r| r.limits.as_ref());
    s.cpus = limits.and_then(|l| l.cpus);
    s.memory = limits.and_then(|l| l.memory);
    s.restart = svc.restart.map(|r| r.0).unwrap_or_default();
    s.network = Some(c.network.to_string());
    for (k, v) in &svc.labels.0 {
        s.labels.insert(k.clone(), v.clone().unwrap_or_default());
    }
    s.labels.insert(LABEL_PROJECT.into(), c.project.into());
    s.labels.insert(LABEL_SERVICE.into(), name.into());
    s.validate().map_err(|e| ("", e.to_string()))?;
    Ok(PlannedService { service: name.to_string(), spec: s, build })
}

/// `KEY`, `VALUE` pairs; a key without a value takes the variable's value (environment, then
/// `.env`), or is left out when it has none (as docker compose does).
fn resolve_env(env: &[(String, Option<String>)], vars: &Vars) -> Vec<(String, String)> {
    env.iter()
        .filter_map(|(k, v)| match v {
            Some(v) => Some((k.clone(), v.clone())),
            None => vars.get(k).map(|v| (k.clone(), v)),
        })
        .collect()
}

/// Drops `.` and folds `..` components, so that `/srv/stack/./html` is `/srv/stack/html`.
fn normalize(p: &Path) -> PathBuf {
    let mut out = PathBuf::new();
    for c in p.components() {
        match c {
            std::path::Component::CurDir => {}
            std::path::Component::ParentDir => {
                out.pop();
            }
            c => out.push(c),
        }
    }
    out
}

/// Service names, dependencies first, otherwise in name order; a cycle is returned as
/// `a -> b -> a`.
fn start_order(f: &ComposeFile) -> std::result::Result<Vec<String>, String> {
    #[derive(Clone, Copy, PartialEq)]
    enum Mark {
        Visiting,
        Done,
    }
    fn visit<'a>(
        f: &'a ComposeFile,
        name: &'a str,
        marks: &mut BTreeMap<&'a str, Mark>,
        path: &mut Vec<&'a str>,
        out: &mut Vec<String>,
    ) -> std::result::Result<(), String> {
        match marks.get(name) {
            Some(Mark::Done) => return Ok(()),
            Some(Mark::Visiting) => {
                let from = path.iter().position(|p| *p == name).unwrap_or(0);
                let mut cycle: Vec<&str> = path[from..].to_vec();
                cycle.push(name);
                return Err(cycle.join(" -> "));
            }
            None => {}
        }
        marks.insert(name, Mark::Visiting);
        path.push(name);
        if let Some(s) = f.services.get(name) {
            for d in &s.depends_on.0 {
                visit(f, d, marks, path, out)?;
            }
        }
        path.pop();
        marks.insert(name, Mark::Done);
        out.push(name.to_string());
        Ok(())
    }
    let mut marks = BTreeMap::new();
    let mut out = Vec::new();
    for name in f.services.keys() {
        visit(f, name, &mut marks, &mut Vec::new(), &mut out)?;
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn plan_of(text: &str) -> Result<Plan> {
        let f = parse("compose.yaml", text)?;
        plan("compose.yaml", &f, Path::new("/srv/stack"), "demo", &Vars::default())
    }

    #[test]
    fn full_service_is_planned() {
        let p = plan_of(
            r#"
services:
  web:
    image: busybox
    command: httpd -f -p 80 -h "/www"
    ports: ["8080:80", 9000:90]
    volumes: ["./html:/www:ro", "/data:/data"]
    environment: {A: 1, B: "two"}
    depends_on: [db]
    deploy: {resources: {limits: {cpus: '0.5', memory: 64m}}}
    restart: on-failure:3
    networks: [front]
  db:
    image: busybox
    kind: microvm
    entrypoint: ["sleep"]
    command: ["1000"]
    environment: ["X=y"]
    container_name: the-db
networks:
  front:
    driver: bridge
"#,
        )
        .unwrap();
        let names: Vec<_> = p.services.iter().map(|s| s.service.as_str()).collect();
        assert_eq!(names, ["db", "web"]);
        let web = &p.services[1].spec;
        assert_eq!(web.name, "demo-web-1");
        assert_eq!(web.command, ["httpd", "-f", "-p", "80", "-h", "/www"]);
        assert_eq!(
            web.ports.iter().map(|p| (p.host_port, p.container_port)).collect::<Vec<_>>(),
            [(8080, 80), (9000, 90)]
        );
        assert_eq!(web.volumes[0], Volume::bind("/srv/stack/html", "/www", true));
        assert!(!web.volumes[1].readonly);
        assert_eq!(web.env, ["A=1", "B=two"]);
        assert_eq!((web.cpus, web.memory), (Some(0.5), Some(64 << 20)));
        assert_eq!(web.restart, isla_core::RestartPolicy::OnFailure { max: 3 });
        assert_eq!(web.network.as_deref(), Some("demo_front"));
        assert_eq!(web.labels[LABEL_PROJECT], "demo");
        assert_eq!(web.labels[LABEL_SERVICE], "web");
        let db = &p.services[0].spec;
        assert_eq!((db.name.as_str(), db.kind), ("the-db", Kind::Microvm));
        assert_eq!(db.command, ["sleep", "1000"]);
        assert_eq!(db.network.as_deref(), Some("demo_default"));
        let nets: Vec<_> = p.networks.iter().map(|n| (n.spec.name.as_str(), n.spec.driver)).collect();
        assert_eq!(nets, [("demo_default", Driver::Nat), ("demo_front", Driver::Nat)]);
    }

    #[test]
    fn unknown_field_names_line_and_field() {
        let e = plan_of("services:\n  web:\n    image: busybox\n    healthcheck: {}\n").unwrap_err();
        let msg = e.to_string();
        assert!(msg.contains("healthcheck") && msg.contains("line 4"), "{msg}");
        assert!(matches!(e, Error::Syntax { line: Some(4), .. }), "{e:?}");
        let e = plan_of("services:\n  web:\n    image: busybox\n    ports: [\"80:80:80:80\"]\n").unwrap_err();
        assert!(e.to_string().contains("services.web.ports") && e.to_string().contains("line 4"), "{e}");
    }

    #[test]
    fn malformed_yaml_names_line_and_column() {
        let e = plan_of("services:\n  web:\n    image: [busybox\n").unwrap_err();
        assert!(matches!(e, Error::Syntax { line: Some(_), column: Some(_), .. }), "{e:?}");
        assert!(e.to_string().contains("line"), "{e}");
    }

    #[test]
    fn cycles_and_dangling_dependencies_are_refused() {
        let e = plan_of(
            "services:\n  a: {image: busybox, depends_on: [b]}\n  b: {image: busybox, depends_on: {c: {condition: service_started}}}\n  c: {image: busybox, depends_on: [a]}\n",
        )
        .unwrap_err();
        assert_eq!(
            e.to_string(),
            "compose.yaml: services.*.depends_on: the services depend on each other in a cycle: a -> b -> c -> a"
        );
        let e = plan_of("services:\n  a: {image: busybox, depends_on: [zz]}\n").unwrap_err();
        assert!(e.to_string().contains("services.a.depends_on") && e.to_string().contains("zz"), "{e}");
    }

    #[test]
    fn unsupported_forms_are_explained() {
        for (text, want) in [
            ("services:\n  a: {image: busybox, volumes: [\"data:/data\"]}\n", "volume `data` is not defined"),
            ("services:\n  a: {image: busybox, volumes: [\"a/b:/data\"]}\n", "neither a path"),
            ("services:\n  a: {image: busybox, networks: [x, y]}\nnetworks: {x: , y: }\n", "one network"),
            ("services:\n  a: {image: busybox, networks: [x]}\n", "not defined"),
            ("services:\n  a: {build: {context: ., target: x}}\n", "unknown field `target`"),
            ("services:\n  a: {build: ., kind: microvm}\n", "only containers"),
            ("services:\n  a: {image: kit, kind: microvm, volumes: [\"/x:/x\"]}\n", "not shared into guests"),
            ("services:\n  a: {}\n", "an image or a build"),
            ("services:\n  a: {image: busybox, restart: sometimes}\n", "sometimes"),
            ("services:\n  a: {image: busybox, depends_on: {b: {condition: service_healthy}}}\n  b: {image: busybox}\n", "health"),
            ("services:\n  a: {image: busybox, container_name: x}\n  b: {image: busybox, container_name: x}\n", "two services"),
            ("services: {}\n", "no service"),
        ] {
            let e = plan_of(text).unwrap_err().to_string();
            assert!(e.contains(want), "{text}: {e}");
        }
    }

    #[test]
    fn project_names_follow_docker() {
        assert_eq!(project_name("My Stack.v2"), "mystackv2");
        assert_eq!(project_name("_x-Y"), "x-y");
        let f = parse("c", "services: {a: {image: busybox}}").unwrap();
        assert!(plan("c", &f, Path::new("/"), "Bad", &Vars::default()).is_err());
    }

    #[test]
    fn variables_are_interpolated_and_errors_located() {
        let vars = Vars { file: [("PORT".to_string(), "8081".to_string())].into(), process_env: false };
        let text = "name: ${PROJECT:-demo}\nservices:\n  web:\n    image: ${IMAGE-busybox}\n    command: sh -c 'echo $$HOME ${GREETING}'\n    ports: [\"${PORT}:80\"]\n    environment: {A: \"${PORT:+set}\", B: \"$${literal}\"}\n";
        let (f, unset) = parse_with("c.yaml", text, &vars).unwrap();
        assert_eq!(unset, ["GREETING"]);
        assert_eq!(f.name.as_deref(), Some("demo"));
        let p = plan("c.yaml", &f, Path::new("/s"), "demo", &vars).unwrap();
        let web = &p.services[0].spec;
        assert_eq!(web.image.as_deref(), Some("busybox"));
        assert_eq!(web.command, ["sh", "-c", "echo $HOME "]);
        assert_eq!(web.ports[0].host_port, 8081);
        assert_eq!(web.env, ["A=set", "B=${literal}"]);
        // A required variable: the error names the field, its line and column.
        let e =
            parse_with("c.yaml", "services:\n  web:\n    image: busybox\n    working_dir: ${DIR:?give DIR}\n", &vars)
                .unwrap_err();
        assert!(matches!(e, Error::Syntax { line: Some(4), .. }), "{e:?}");
        let msg = e.to_string();
        assert!(
            msg.contains("services.web.working_dir")
                && msg.contains("required variable DIR is missing a value: give DIR"),
            "{msg}"
        );
        let e = parse_with("c.yaml", "services:\n  web:\n    image: busybox\n    command: echo ${oops\n", &vars)
            .unwrap_err();
        assert!(e.to_string().contains("services.web.command") && e.to_string().contains("line 4"), "{e}");
    }

    #[test]
    fn named_volumes_and_builds_are_planned() {
        let p = plan_of(
            "services:\n  app:\n    build: {context: ./app, dockerfile: Dockerfile.dev, args: {V: 1}}\n    volumes: [\"data:/data:ro\", \"./x:/x\"]\n  db:\n    image: busybox\n    build: ./db\n    volumes: [\"shared:/s\"]\nvolumes:\n  data:\n  shared: {external: true}\n",
        )
        .unwrap();
        let vols: Vec<_> = p.volumes.iter().map(|v| (v.key.as_str(), v.name.as_str(), v.external)).collect();
        assert_eq!(vols, [("data", "demo_data", false), ("shared", "shared", true)]);
        assert_eq!(p.volumes[0].labels[LABEL_PROJECT], "demo");
        let app = &p.services[0];
        assert_eq!(app.spec.image.as_deref(), Some("demo-app"));
        assert_eq!(app.spec.volumes[0], Volume::named("demo_data", "/data", true));
        assert_eq!(app.spec.volumes[1], Volume::bind("/srv/stack/x", "/x", false));
        let b = app.build.as_ref().unwrap();
        assert_eq!(b.context, Path::new("/srv/stack/app"));
        assert_eq!(b.file.as_deref(), Some(Path::new("/srv/stack/app/Dockerfile.dev")));
        assert_eq!(b.args.get("V").map(String::as_str), Some("1"));
        let db = &p.services[1];
        assert_eq!(db.spec.image.as_deref(), Some("busybox"));
        assert_eq!(db.build.as_ref().unwrap().context, Path::new("/srv/stack/db"));
        assert_eq!(db.spec.volumes[0], Volume::named("shared", "/s", false));
    }
}
