//! The subset of the docker-compose format that isla implements, as serde types. Every struct
//! denies unknown fields; values that take several forms (a command as a string or a list,
//! `environment` as a map or a list, ...) are read through [`serde_yaml::Value`] and checked
//! as they are read, so that an error carries its location.

use std::collections::BTreeMap;

use isla_core::{model, Kind, RestartPolicy};
use isla_net::PortSpec;
use serde::de::Error as _;
use serde::{Deserialize, Deserializer};
use serde_yaml::Value;

use crate::interpolate::Interpolated;

/// A whole stack file.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ComposeFile {
    /// Obsolete in the format; accepted and ignored.
    #[serde(default)]
    pub version: Option<Value>,
    /// Project name (overridden by `-p`).
    #[serde(default, deserialize_with = "text")]
    pub name: Option<String>,
    /// The services by name.
    pub services: BTreeMap<String, Service>,
    /// Project networks by key; a key with no value gets the defaults.
    #[serde(default)]
    pub networks: BTreeMap<String, Option<NetworkDef>>,
    /// Named volumes by key; a key with no value gets the defaults.
    #[serde(default)]
    pub volumes: BTreeMap<String, Option<VolumeDef>>,
}

/// One service.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Service {
    /// Image (e.g. the built-in `busybox`; `kit` for a microVM of the guest kit). With
    /// `build:`, the name the built image gets (default `<project>-<service>`).
    #[serde(default, deserialize_with = "text")]
    pub image: Option<String>,
    /// Build the image from a Containerfile (`isla build`): a context directory, or
    /// `{context, dockerfile, args}`.
    #[serde(default)]
    pub build: Option<Build>,
    /// What runs it (isla's extension): container (default), microvm or vm.
    #[serde(default)]
    pub kind: Option<Kind>,
    /// Replaces the image's CMD.
    #[serde(default)]
    pub command: Option<Words>,
    /// Put in front of the command (see docs/compose.md for images that have an ENTRYPOINT).
    #[serde(default)]
    pub entrypoint: Option<Words>,
    /// Published ports, `[HOST_IP:]HOST_PORT:PORT[/PROTO]`.
    #[serde(default)]
    pub ports: Vec<Port>,
    /// Mounts, `HOST:CONTAINER[:ro|rw]` (a relative host path is read against the file's
    /// directory) or `VOLUME:CONTAINER[:ro|rw]` (a key of the top-level `volumes:`).
    #[serde(default)]
    pub volumes: Vec<VolumeEntry>,
    /// Environment, as a map or a `KEY=VALUE` list.
    #[serde(default)]
    pub environment: Environment,
    /// Services started before this one.
    #[serde(default)]
    pub depends_on: DependsOn,
    /// The project network the service joins (isla attaches an instance to one network).
    #[serde(default)]
    pub networks: ServiceNetworks,
    /// Resource limits.
    #[serde(default)]
    pub deploy: Option<Deploy>,
    /// Restart policy.
    #[serde(default)]
    pub restart: Option<Restart>,
    /// Instance name instead of `<project>-<service>-1`.
    #[serde(default, deserialize_with = "text")]
    pub container_name: Option<String>,
    /// Working directory inside the instance.
    #[serde(default, deserialize_with = "text")]
    pub working_dir: Option<String>,
    /// Labels, as a map or a `KEY=VALUE` list.
    #[serde(default)]
    pub labels: Environment,
}

/// A project network.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NetworkDef {
    /// `bridge` (Docker's name) or `nat`: isla's NAT network; `host-only`.
    #[serde(default, deserialize_with = "text")]
    pub driver: Option<String>,
    /// No way out: a host-only network.
    #[serde(default)]
    pub internal: bool,
    /// An existing isla network, neither created nor removed by the project.
    #[serde(default)]
    pub external: bool,
    /// The isla network's name (default `<project>_<key>`, or the key when external).
    #[serde(default, deserialize_with = "text")]
    pub name: Option<String>,
}

/// A named volume of the project (top-level `volumes:`).
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VolumeDef {
    /// Only `local` (a directory below isla's root).
    #[serde(default, deserialize_with = "text")]
    pub driver: Option<String>,
    /// An existing isla volume, neither created nor removed by the project.
    #[serde(default)]
    pub external: bool,
    /// The isla volume's name (default `<project>_<key>`, or the key when external).
    #[serde(default, deserialize_with = "text")]
    pub name: Option<String>,
    /// Labels, as a map or a `KEY=VALUE` list.
    #[serde(default)]
    pub labels: Environment,
}

/// `build:`: a context directory, or the long form.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Build {
    /// The context directory, relative to the stack file's directory (default `.`).
    pub context: Option<String>,
    /// The Containerfile, relative to the context (default `Containerfile`, else `Dockerfile`).
    pub dockerfile: Option<String>,
    /// Build arguments (`ARG` values), as a map or a `KEY=VALUE` list.
    pub args: Environment,
}

/// The long form of `build:`, as written (already interpolated).
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct BuildLong {
    #[serde(default)]
    context: Option<String>,
    #[serde(default)]
    dockerfile: Option<String>,
    #[serde(default)]
    args: Value,
}

impl Build {
    fn from_value(v: Value) -> Result<Build, String> {
        match v {
            Value::String(s) => Ok(Build { context: Some(s), ..Build::default() }),
            m @ Value::Mapping(_) => {
                let b: BuildLong = serde_yaml::from_value(m).map_err(|e| e.to_string())?;
                Ok(Build { context: b.context, dockerfile: b.dockerfile, args: Environment::from_value(b.args)? })
            }
            _ => Err("expected a context directory or a map with context, dockerfile, args".into()),
        }
    }
}

/// `deploy:` (only `resources` is read).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Deploy {
    /// Limits.
    #[serde(default)]
    pub resources: Option<Resources>,
}

/// `deploy.resources:`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Resources {
    /// Hard limits.
    #[serde(default)]
    pub limits: Option<Limits>,
}

/// `deploy.resources.limits:`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Limits {
    /// CPUs, e.g. `0.5` or `'0.5'`.
    #[serde(default, deserialize_with = "cpus")]
    pub cpus: Option<f64>,
    /// Memory, e.g. `64m` or `1g`.
    #[serde(default, deserialize_with = "memory")]
    pub memory: Option<u64>,
}

/// Reads a value through [`Value`], interpolates its strings (`${VAR}`, see
/// [`crate::interpolate`]) and converts it with `f`; an error of either becomes a located
/// serde error.
fn via_value<'de, D: Deserializer<'de>, T>(d: D, f: impl FnOnce(Value) -> Result<T, String>) -> Result<T, D::Error> {
    f(Interpolated::deserialize(d)?.0).map_err(D::Error::custom)
}

/// An optional string, interpolated.
fn text<'de, D: Deserializer<'de>>(d: D) -> Result<Option<String>, D::Error> {
    via_value(d, |v| match v {
        Value::Null => Ok(None),
        v => scalar(&v).map(Some).ok_or_else(|| "expected a string".to_string()),
    })
}

impl<'de> Deserialize<'de> for Build {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        via_value(d, Build::from_value)
    }
}

/// A scalar as a string (numbers and booleans as YAML writes them).
fn scalar(v: &Value) -> Option<String> {
    match v {
        Value::String(s) => Some(s.clone()),
        Value::Number(n) => Some(n.to_string()),
        Value::Bool(b) => Some(b.to_string()),
        _ => None,
    }
}

fn cpus<'de, D: Deserializer<'de>>(d: D) -> Result<Option<f64>, D::Error> {
    via_value(d, |v| {
        let s = scalar(&v).ok_or("cpus: expected a number such as 0.5")?;
        model::parse_cpus(&s).map(Some).map_err(|e| e.to_string())
    })
}

fn memory<'de, D: Deserializer<'de>>(d: D) -> Result<Option<u64>, D::Error> {
    via_value(d, |v| {
        let s = scalar(&v).ok_or("memory: expected a size such as 64m")?;
        model::parse_memory(&s).map(Some).map_err(|e| e.to_string())
    })
}

/// A command line: a list, or a string split as a shell would.
#[derive(Debug, Clone, PartialEq)]
pub struct Words(pub Vec<String>);

impl<'de> Deserialize<'de> for Words {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        via_value(d, |v| match v {
            Value::String(s) => {
                shlex::split(&s).map(Words).ok_or_else(|| format!("`{s}`: unbalanced quotes or a trailing backslash"))
            }
            Value::Sequence(items) => items
                .iter()
                .map(|i| scalar(i).ok_or_else(|| "expected a list of strings".to_string()))
                .collect::<Result<_, _>>()
                .map(Words),
            _ => Err("expected a string or a list of strings".into()),
        })
    }
}

/// One published port.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Port(pub PortSpec);

impl<'de> Deserialize<'de> for Port {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        via_value(d, |v| match &v {
            Value::Mapping(_) => Err("the long port syntax is not supported; write \"HOST_PORT:PORT\"".into()),
            _ => {
                let s = scalar(&v).ok_or("expected \"[HOST_IP:]HOST_PORT:PORT[/tcp|udp]\"")?;
                s.parse().map(Port).map_err(|e: isla_net::Error| e.to_string())
            }
        })
    }
}

/// One mount as written: a bind mount (the host path is resolved by the plan) or a named volume
/// (a key of the top-level `volumes:`).
#[derive(Debug, Clone, PartialEq)]
pub struct VolumeEntry {
    /// Host path as written (absolute, or relative to the file's directory), or the volume key.
    pub host: String,
    /// Absolute path inside the instance.
    pub guest: String,
    /// Read-only.
    pub readonly: bool,
    /// `host` is a volume key, not a path.
    pub named: bool,
}

impl<'de> Deserialize<'de> for VolumeEntry {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        via_value(d, |v| {
            let s = match v {
                Value::String(s) => s,
                Value::Mapping(_) => {
                    return Err("the long volume syntax is not supported; write \"SOURCE:CONTAINER[:ro]\"".into())
                }
                _ => return Err("expected \"HOST:CONTAINER[:ro]\"".into()),
            };
            let parts: Vec<&str> = s.split(':').collect();
            let (host, guest, readonly) = match parts.as_slice() {
                [h, g] => (*h, *g, false),
                [h, g, "ro"] => (*h, *g, true),
                [h, g, "rw"] => (*h, *g, false),
                [_, _, o] => return Err(format!("`{s}`: unknown option `{o}` (expected ro or rw)")),
                _ => return Err(format!("`{s}`: expected HOST_PATH:CONTAINER[:ro] or VOLUME:CONTAINER[:ro]")),
            };
            let path = host.starts_with('/') || host.starts_with("./") || host.starts_with("../") || host == ".";
            if !path && (host.contains('/') || model::check_volume_name(host).is_err()) {
                return Err(format!(
                    "`{s}`: `{host}` is neither a path (start it with ./ or /) nor a volume name (letters, digits, _ . -)"
                ));
            }
            if !guest.starts_with('/') || guest.split('/').any(|c| c == "..") {
                return Err(format!("`{s}`: the container path must be absolute and without `..`"));
            }
            Ok(VolumeEntry { host: host.to_string(), guest: guest.to_string(), readonly, named: !path })
        })
    }
}

/// `KEY: value` pairs, from a map or a `KEY=VALUE` list; a value of None (a bare `KEY`, or
/// `KEY:` with no value) takes the value of the caller's environment.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Environment(pub Vec<(String, Option<String>)>);

impl<'de> Deserialize<'de> for Environment {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        via_value(d, Environment::from_value)
    }
}

impl Environment {
    fn from_value(v: Value) -> Result<Environment, String> {
        match v {
            Value::Mapping(m) => m
                .iter()
                .map(|(k, v)| {
                    let k = scalar(k).ok_or("keys must be strings")?;
                    match v {
                        Value::Null => Ok((k, None)),
                        v => Ok((k.clone(), Some(scalar(v).ok_or(format!("`{k}`: expected a string or a number"))?))),
                    }
                })
                .collect::<Result<_, String>>()
                .map(Environment),
            Value::Sequence(items) => items
                .iter()
                .map(|i| {
                    let s = scalar(i).ok_or("expected a list of KEY=VALUE strings")?;
                    Ok(match s.split_once('=') {
                        Some((k, v)) => (k.to_string(), Some(v.to_string())),
                        None => (s, None),
                    })
                })
                .collect::<Result<_, String>>()
                .map(Environment),
            Value::Null => Ok(Environment::default()),
            _ => Err("expected a map or a list of KEY=VALUE strings".into()),
        }
    }
}

/// Service names from a list, or from a map whose values may only ask for
/// `condition: service_started` (isla does not run health checks).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct DependsOn(pub Vec<String>);

impl<'de> Deserialize<'de> for DependsOn {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        via_value(d, |v| {
            names(v, "depends_on", |name, opts| {
                for (k, v) in opts {
                    match (scalar(k).as_deref(), scalar(v).as_deref()) {
                        (Some("condition"), Some("service_started")) => {}
                        (Some("condition"), c) => {
                            return Err(format!(
                            "{name}: condition {} is not supported (isla has no health checks); use service_started",
                            c.unwrap_or("?")
                        ))
                        }
                        (Some("restart" | "required"), _) => {}
                        (k, _) => return Err(format!("{name}: unknown field `{}`", k.unwrap_or("?"))),
                    }
                }
                Ok(())
            })
        })
        .map(DependsOn)
    }
}

/// Network keys from a list, or from a map whose values must be empty (no aliases or
/// addresses yet).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ServiceNetworks(pub Vec<String>);

impl<'de> Deserialize<'de> for ServiceNetworks {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        via_value(d, |v| {
            names(v, "networks", |name, opts| match opts.iter().next() {
                None => Ok(()),
                Some((k, _)) => Err(format!(
                    "{name}: field `{}` is not supported (aliases and fixed addresses are not implemented)",
                    scalar(k).unwrap_or_default()
                )),
            })
        })
        .map(ServiceNetworks)
    }
}

/// Names from a list or the keys of a map, each map value checked by `check`.
fn names(
    v: Value,
    what: &str,
    check: impl Fn(&str, &serde_yaml::Mapping) -> Result<(), String>,
) -> Result<Vec<String>, String> {
    let expected = || format!("{what}: expected a list of names or a map");
    match v {
        Value::Null => Ok(Vec::new()),
        Value::Sequence(items) => items.iter().map(|i| scalar(i).ok_or_else(expected)).collect(),
        Value::Mapping(m) => m
            .iter()
            .map(|(k, v)| {
                let name = scalar(k).ok_or_else(expected)?;
                match v {
                    Value::Null => {}
                    Value::Mapping(opts) => check(&name, opts)?,
                    _ => return Err(format!("{what}: {name}: expected a map of options")),
                }
                Ok(name)
            })
            .collect(),
        _ => Err(expected()),
    }
}

/// A restart policy (`no`, `always`, `unless-stopped`, `on-failure[:N]`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Restart(pub RestartPolicy);

impl<'de> Deserialize<'de> for Restart {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        via_value(d, |v| match v {
            // `restart: no` is a boolean in YAML 1.1 files.
            Value::Bool(false) => Ok(Restart(RestartPolicy::No)),
            Value::String(s) => s.parse().map(Restart).map_err(|e: isla_core::Error| e.to_string()),
            _ => Err("expected no, always, unless-stopped or on-failure[:N]".into()),
        })
    }
}
