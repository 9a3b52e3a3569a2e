//! The persistent store: one SQLite database, `<root>/isla.db`, in WAL mode.
//!
//! The table `instances` holds every instance with its spec (JSON), status and the processes
//! that own it; `volumes` holds the named volumes (schema version 2; a version-1 database is
//! migrated in place, its instances kept). Multi-step operations first record an *intent* (`creating`, `removing`) with the
//! pid and start time of the process doing them, in a transaction; when that process is gone
//! and the intent is still there, [`crate::Manager::open`] rolls the creation back or finishes
//! the removal. Name uniqueness is a `UNIQUE` constraint, so two concurrent `create`s of one
//! name cannot both win. The schema version is SQLite's `user_version`.

use std::path::{Path, PathBuf};
use std::time::Duration;

use rusqlite::{params, Connection, OptionalExtension, Row};

use crate::error::{Error, Result};
use crate::model::{Instance, InstanceSpec, Status};
use crate::proc::Owner;

/// The schema this code reads and writes.
pub const SCHEMA_VERSION: i64 = 2;

const SCHEMA: &str = "
CREATE TABLE instances (
    id TEXT PRIMARY KEY,
    name TEXT NOT NULL UNIQUE,
    kind TEXT NOT NULL,
    spec TEXT NOT NULL,
    intent TEXT,
    intent_pid INTEGER,
    intent_start INTEGER,
    status TEXT NOT NULL,
    exit_code INTEGER,
    pid INTEGER,
    pid_start INTEGER,
    sup_pid INTEGER,
    sup_start INTEGER,
    stop_requested INTEGER NOT NULL DEFAULT 0,
    created TEXT NOT NULL,
    started TEXT,
    finished TEXT,
    restart_count INTEGER NOT NULL DEFAULT 0,
    attachment TEXT,
    error TEXT
);
";

/// Added by version 2: named volumes (`-v NAME:/path`, `isla volume`).
const SCHEMA_V2: &str = "
CREATE TABLE volumes (
    name TEXT PRIMARY KEY,
    created TEXT NOT NULL,
    labels TEXT NOT NULL DEFAULT '{}'
);
";

/// A named volume as the store has it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VolumeRow {
    /// The name.
    pub name: String,
    /// RFC 3339 creation time.
    pub created: String,
    /// Free-form labels (compose marks its volumes with the project).
    pub labels: std::collections::BTreeMap<String, String>,
}

/// An intent left by a multi-step operation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Intent {
    /// The instance is being created: roll back if its owner is gone.
    Creating,
    /// The instance is being removed: finish if its owner is gone.
    Removing,
}

impl Intent {
    fn as_str(self) -> &'static str {
        match self {
            Intent::Creating => "creating",
            Intent::Removing => "removing",
        }
    }
}

/// A row as the store has it: the instance plus the bookkeeping the manager needs.
#[derive(Debug, Clone)]
pub struct Record {
    /// The instance.
    pub instance: Instance,
    /// Unfinished operation and its owner.
    pub intent: Option<(Intent, Owner)>,
    /// The supervisor, while one runs.
    pub supervisor: Option<Owner>,
    /// The user asked it to stop: no restart.
    pub stop_requested: bool,
}

/// The open database.
pub struct Store {
    conn: Connection,
    path: PathBuf,
    root: PathBuf,
}

fn status_parts(s: Status) -> (&'static str, Option<i32>) {
    match s {
        Status::Created => ("created", None),
        Status::Running => ("running", None),
        Status::Paused => ("paused", None),
        Status::Stopped => ("stopped", None),
        Status::Exited(c) => ("exited", Some(c)),
        Status::Dead => ("dead", None),
    }
}

impl Store {
    /// Opens (creating if needed) `<root>/isla.db`.
    pub fn open(root: &Path) -> Result<Store> {
        let path = root.join("isla.db");
        let db = |source| Error::Db { path: path.clone(), source };
        let conn = Connection::open(&path).map_err(db)?;
        let busy_timeout = Duration::from_secs(30);
        conn.busy_timeout(busy_timeout).map_err(db)?;
        // Switching a new database to WAL needs it to itself, and SQLite does not wait for that
        // through the busy timeout: two commands opening a fresh root at once would see "database
        // is locked". Wait here instead, as long as the busy timeout.
        let deadline = std::time::Instant::now() + busy_timeout;
        loop {
            match conn.pragma_update(None, "journal_mode", "WAL") {
                Err(rusqlite::Error::SqliteFailure(e, _))
                    if matches!(e.code, rusqlite::ErrorCode::DatabaseBusy | rusqlite::ErrorCode::DatabaseLocked)
                        && std::time::Instant::now() < deadline =>
                {
                    std::thread::sleep(Duration::from_millis(10));
                }
                r => break r.map_err(db)?,
            }
        }
        conn.pragma_update(None, "synchronous", "FULL").map_err(db)?;
        let store = Store { conn, path: path.clone(), root: root.to_path_buf() };
        store.migrate()?;
        Ok(store)
    }

    fn db(&self) -> impl Fn(rusqlite::Error) -> Error + '_ {
        move |source| Error::Db { path: self.path.clone(), source }
    }

    /// Runs `f` in a `BEGIN IMMEDIATE` transaction: it takes the write lock first (waiting up
    /// to the busy timeout), so a read-then-write cannot fail with SQLITE_BUSY half-way as a
    /// deferred transaction does when another process wrote in between.
    fn immediate<T>(&self, f: impl FnOnce(&Connection) -> Result<T>) -> Result<T> {
        self.conn.execute_batch("BEGIN IMMEDIATE").map_err(self.db())?;
        match f(&self.conn) {
            Ok(v) => {
                self.conn.execute_batch("COMMIT").map_err(self.db())?;
                Ok(v)
            }
            Err(e) => {
                let _ = self.conn.execute_batch("ROLLBACK");
                Err(e)
            }
        }
    }

    fn migrate(&self) -> Result<()> {
        self.immediate(|tx| {
            let v: i64 = tx.query_row("PRAGMA user_version", [], |r| r.get(0)).map_err(self.db())?;
            match v {
                SCHEMA_VERSION => return Ok(()),
                0 => tx.execute_batch(SCHEMA).map_err(self.db())?,
                1 => {}
                other => {
                    return Err(Error::Db {
                        path: self.path.clone(),
                        source: rusqlite::Error::InvalidParameterName(format!(
                            "schema version {other} is newer than this isla understands ({SCHEMA_VERSION}); use a newer isla"
                        )),
                    })
                }
            }
            // Each step upgrades one version; all run in this one transaction.
            tx.execute_batch(SCHEMA_V2).map_err(self.db())?;
            tx.pragma_update(None, "user_version", SCHEMA_VERSION).map_err(self.db())
        })
    }

    /// The database file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    fn row(&self, r: &Row<'_>) -> rusqlite::Result<Record> {
        let id: String = r.get("id")?;
        let spec_json: String = r.get("spec")?;
        let spec: InstanceSpec = serde_json::from_str(&spec_json)
            .map_err(|e| rusqlite::Error::FromSqlConversionFailure(3, rusqlite::types::Type::Text, Box::new(e)))?;
        let exit_code: Option<i32> = r.get("exit_code")?;
        let status = match r.get::<_, String>("status")?.as_str() {
            "created" => Status::Created,
            "running" => Status::Running,
            "paused" => Status::Paused,
            "stopped" => Status::Stopped,
            "exited" => Status::Exited(exit_code.unwrap_or(-1)),
            _ => Status::Dead,
        };
        let owner = |p: Option<i32>, s: Option<i64>| p.map(|pid| Owner { pid, start: s.unwrap_or(0) as u64 });
        let intent = match r.get::<_, Option<String>>("intent")?.as_deref() {
            Some("creating") => Some(Intent::Creating),
            Some("removing") => Some(Intent::Removing),
            _ => None,
        };
        let intent_owner = owner(r.get("intent_pid")?, r.get("intent_start")?);
        let attachment: Option<String> = r.get("attachment")?;
        let instance = Instance {
            log_path: self.root.join("instances").join(&id).join("log"),
            id,
            spec,
            status,
            exit_code,
            pid: r.get("pid")?,
            pid_start: r.get::<_, Option<i64>>("pid_start")?.map(|s| s as u64),
            supervisor_pid: r.get("sup_pid")?,
            created: r.get("created")?,
            started: r.get("started")?,
            finished: r.get("finished")?,
            restart_count: r.get("restart_count")?,
            attachment: attachment.and_then(|a| serde_json::from_str(&a).ok()),
            error: r.get("error")?,
        };
        Ok(Record {
            instance,
            intent: intent.zip(intent_owner),
            supervisor: owner(r.get("sup_pid")?, r.get("sup_start")?),
            stop_requested: r.get::<_, i64>("stop_requested")? != 0,
        })
    }

    /// Records a new instance with the `creating` intent owned by `owner`, and the named
    /// volumes it uses that do not exist yet, in one transaction (so a concurrent `volume rm`
    /// sees either no volume or a volume in use). A taken name gives [`Error::NameInUse`].
    pub fn insert_creating(&self, inst: &Instance, owner: Owner) -> Result<()> {
        let spec = serde_json::to_string(&inst.spec).map_err(|e| Error::invalid("spec", e.to_string()))?;
        self.immediate(|tx| {
            for v in inst.spec.volumes.iter().filter_map(|v| v.name.as_deref()) {
                tx.execute("INSERT OR IGNORE INTO volumes (name, created) VALUES (?1, ?2)", params![v, inst.created])
                    .map_err(self.db())?;
            }
            let res = tx.execute(
                "INSERT INTO instances (id, name, kind, spec, intent, intent_pid, intent_start, status, created)
                 VALUES (?1, ?2, ?3, ?4, 'creating', ?5, ?6, 'created', ?7)",
                params![
                    inst.id,
                    inst.spec.name,
                    inst.spec.kind.as_str(),
                    spec,
                    owner.pid,
                    owner.start as i64,
                    inst.created
                ],
            );
            match res {
                Ok(_) => Ok(()),
                Err(rusqlite::Error::SqliteFailure(e, Some(msg)))
                    if e.code == rusqlite::ErrorCode::ConstraintViolation && msg.contains("name") =>
                {
                    Err(Error::NameInUse(inst.spec.name.clone()))
                }
                Err(e) => Err(self.db()(e)),
            }
        })
    }

    fn volume_row(r: &Row<'_>) -> rusqlite::Result<VolumeRow> {
        let labels: String = r.get("labels")?;
        Ok(VolumeRow {
            name: r.get("name")?,
            created: r.get("created")?,
            labels: serde_json::from_str(&labels).unwrap_or_default(),
        })
    }

    /// Records the volume `name` unless it exists; the row, and whether it was new.
    pub fn volume_create(
        &self,
        name: &str,
        labels: &std::collections::BTreeMap<String, String>,
        created: &str,
    ) -> Result<(VolumeRow, bool)> {
        let labels = serde_json::to_string(labels).map_err(|e| Error::invalid("labels", e.to_string()))?;
        self.immediate(|tx| {
            let n = tx
                .execute(
                    "INSERT OR IGNORE INTO volumes (name, created, labels) VALUES (?1, ?2, ?3)",
                    params![name, created, labels],
                )
                .map_err(self.db())?;
            let row = tx
                .query_row("SELECT * FROM volumes WHERE name = ?1", params![name], Self::volume_row)
                .map_err(self.db())?;
            Ok((row, n == 1))
        })
    }

    /// The volume `name`, if recorded.
    pub fn volume_get(&self, name: &str) -> Result<Option<VolumeRow>> {
        self.conn
            .query_row("SELECT * FROM volumes WHERE name = ?1", params![name], Self::volume_row)
            .optional()
            .map_err(self.db())
    }

    /// Every volume, by name.
    pub fn volume_list(&self) -> Result<Vec<VolumeRow>> {
        let mut st = self.conn.prepare("SELECT * FROM volumes ORDER BY name").map_err(self.db())?;
        let rows = st.query_map([], Self::volume_row).map_err(self.db())?;
        rows.collect::<rusqlite::Result<Vec<_>>>().map_err(self.db())
    }

    /// Names of the instances (in any state) whose spec mounts the volume `name`.
    pub fn volume_users(&self, name: &str) -> Result<Vec<String>> {
        Ok(self
            .list()?
            .into_iter()
            .filter(|r| r.instance.spec.volumes.iter().any(|v| v.name.as_deref() == Some(name)))
            .map(|r| r.instance.spec.name)
            .collect())
    }

    /// Removes the volume `name` unless an instance uses it: `remove_data` deletes its files
    /// while the write lock is held, so no instance can start using it in between.
    pub fn volume_remove(&self, name: &str, remove_data: impl FnOnce() -> Result<()>) -> Result<()> {
        self.immediate(|tx| {
            if self.volume_get(name)?.is_none() {
                return Err(Error::NoSuchVolume(name.to_string()));
            }
            let users = self.volume_users(name)?;
            if !users.is_empty() {
                return Err(Error::VolumeInUse { name: name.to_string(), users: users.join(", ") });
            }
            remove_data()?;
            tx.execute("DELETE FROM volumes WHERE name = ?1", params![name]).map_err(self.db())?;
            Ok(())
        })
    }

    /// Sets (or with None clears) the intent of `id`.
    pub fn set_intent(&self, id: &str, intent: Option<(Intent, Owner)>) -> Result<()> {
        let (i, p, s) = match intent {
            Some((i, o)) => (Some(i.as_str()), Some(o.pid), Some(o.start as i64)),
            None => (None, None, None),
        };
        self.conn
            .execute(
                "UPDATE instances SET intent = ?2, intent_pid = ?3, intent_start = ?4 WHERE id = ?1",
                params![id, i, p, s],
            )
            .map_err(self.db())?;
        Ok(())
    }

    /// Deletes the row of `id`.
    pub fn delete(&self, id: &str) -> Result<()> {
        self.conn.execute("DELETE FROM instances WHERE id = ?1", params![id]).map_err(self.db())?;
        Ok(())
    }

    /// Every row, oldest first.
    pub fn list(&self) -> Result<Vec<Record>> {
        let mut st = self.conn.prepare("SELECT * FROM instances ORDER BY created, id").map_err(self.db())?;
        let rows = st.query_map([], |r| self.row(r)).map_err(self.db())?;
        rows.collect::<rusqlite::Result<Vec<_>>>().map_err(self.db())
    }

    /// The row of `id`, if any.
    pub fn get(&self, id: &str) -> Result<Option<Record>> {
        self.conn
            .query_row("SELECT * FROM instances WHERE id = ?1", params![id], |r| self.row(r))
            .optional()
            .map_err(self.db())
    }

    /// Finds an instance by exact name, exact id or unique id prefix (Docker's rule).
    pub fn find(&self, what: &str) -> Result<Record> {
        if let Some(r) = self
            .conn
            .query_row("SELECT * FROM instances WHERE name = ?1 OR id = ?1", params![what], |r| self.row(r))
            .optional()
            .map_err(self.db())?
        {
            return Ok(r);
        }
        if what.is_empty() || !what.chars().all(|c| c.is_ascii_hexdigit()) {
            return Err(Error::NotFound(what.to_string()));
        }
        let mut st = self.conn.prepare("SELECT * FROM instances WHERE id LIKE ?1 || '%'").map_err(self.db())?;
        let mut rows = st
            .query_map(params![what], |r| self.row(r))
            .map_err(self.db())?
            .collect::<rusqlite::Result<Vec<_>>>()
            .map_err(self.db())?;
        match rows.len() {
            0 => Err(Error::NotFound(what.to_string())),
            1 => Ok(rows.remove(0)),
            _ => Err(Error::Ambiguous(what.to_string())),
        }
    }

    /// Sets the status (and exit code, for `Exited` and `Stopped`), with the finish time when
    /// the instance is no longer active.
    pub fn set_status(&self, id: &str, status: Status, exit_code: Option<i32>, finished: Option<&str>) -> Result<()> {
        let (s, c) = status_parts(status);
        self.conn
            .execute(
                "UPDATE instances SET status = ?2, exit_code = COALESCE(?3, exit_code), finished = COALESCE(?4, finished)
                 WHERE id = ?1",
                params![id, s, c.or(exit_code), finished],
            )
            .map_err(self.db())?;
        Ok(())
    }

    /// Claims the supervision of `id` for `owner` unless a live supervisor holds it. Returns
    /// whether the claim succeeded. Clears the stop request and, with `fresh`, the restart count.
    pub fn claim_supervisor(&self, id: &str, owner: Owner, fresh: bool) -> Result<bool> {
        self.immediate(|tx| {
            let cur: Option<(Option<i32>, Option<i64>)> = tx
                .query_row("SELECT sup_pid, sup_start FROM instances WHERE id = ?1", params![id], |r| {
                    Ok((r.get(0)?, r.get(1)?))
                })
                .optional()
                .map_err(self.db())?;
            let Some((pid, start)) = cur else { return Ok(false) };
            if let Some(pid) = pid {
                if (Owner { pid, start: start.unwrap_or(0) as u64 }).alive() && pid != owner.pid {
                    return Ok(false);
                }
            }
            tx.execute(
                "UPDATE instances SET sup_pid = ?2, sup_start = ?3, stop_requested = 0, error = NULL,
                 restart_count = CASE WHEN ?4 THEN 0 ELSE restart_count END WHERE id = ?1",
                params![id, owner.pid, owner.start as i64, fresh],
            )
            .map_err(self.db())?;
            Ok(true)
        })
    }

    /// Records a start: running, the main process, the start time and the network attachment.
    pub fn set_running(
        &self,
        id: &str,
        main: Owner,
        started: &str,
        attachment: Option<&isla_net::Attachment>,
    ) -> Result<()> {
        let a = attachment.map(|a| serde_json::to_string(a).unwrap_or_default());
        self.conn
            .execute(
                "UPDATE instances SET status = 'running', pid = ?2, pid_start = ?3, started = ?4, attachment = ?5
                 WHERE id = ?1",
                params![id, main.pid, main.start as i64, started, a],
            )
            .map_err(self.db())?;
        Ok(())
    }

    /// Records the end of a run: clears pid and attachment (the supervisor stays recorded until
    /// [`Store::release_supervisor`]).
    pub fn set_ended(
        &self,
        id: &str,
        status: Status,
        code: Option<i32>,
        finished: &str,
        error: Option<&str>,
    ) -> Result<()> {
        self.set_status(id, status, code, Some(finished))?;
        self.conn
            .execute(
                "UPDATE instances SET pid = NULL, pid_start = NULL, attachment = NULL, error = COALESCE(?2, error)
                 WHERE id = ?1",
                params![id, error],
            )
            .map_err(self.db())?;
        Ok(())
    }

    /// The supervisor is done.
    pub fn release_supervisor(&self, id: &str) -> Result<()> {
        self.conn
            .execute("UPDATE instances SET sup_pid = NULL, sup_start = NULL WHERE id = ?1", params![id])
            .map_err(self.db())?;
        Ok(())
    }

    /// Records an error message for `id`.
    pub fn set_error(&self, id: &str, error: &str) -> Result<()> {
        self.conn.execute("UPDATE instances SET error = ?2 WHERE id = ?1", params![id, error]).map_err(self.db())?;
        Ok(())
    }

    /// Asks the supervisor not to restart `id` after its next exit.
    pub fn request_stop(&self, id: &str) -> Result<()> {
        self.conn.execute("UPDATE instances SET stop_requested = 1 WHERE id = ?1", params![id]).map_err(self.db())?;
        Ok(())
    }

    /// Counts a restart done by the restart policy.
    pub fn count_restart(&self, id: &str) -> Result<u32> {
        self.conn
            .query_row(
                "UPDATE instances SET restart_count = restart_count + 1 WHERE id = ?1 RETURNING restart_count",
                params![id],
                |r| r.get(0),
            )
            .map_err(self.db())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::InstanceSpec;

    fn inst(id: &str, name: &str) -> Instance {
        Instance {
            id: id.into(),
            spec: InstanceSpec::container(name, "busybox"),
            status: Status::Created,
            exit_code: None,
            pid: None,
            pid_start: None,
            supervisor_pid: None,
            created: crate::proc::now_rfc3339(),
            started: None,
            finished: None,
            restart_count: 0,
            attachment: None,
            error: None,
            log_path: PathBuf::new(),
        }
    }

    #[test]
    fn names_are_unique_and_lookups_work() {
        let dir = tempfile::tempdir().unwrap();
        let s = Store::open(dir.path()).unwrap();
        let me = Owner::current();
        s.insert_creating(&inst("abcdef0011", "web"), me).unwrap();
        let err = s.insert_creating(&inst("abcdef0022", "web"), me).unwrap_err();
        assert!(matches!(err, Error::NameInUse(ref n) if n == "web"), "{err}");
        s.insert_creating(&inst("abcdef0033", "db"), me).unwrap();
        assert_eq!(s.find("web").unwrap().instance.id, "abcdef0011");
        assert_eq!(s.find("abcdef0033").unwrap().instance.spec.name, "db");
        assert!(matches!(s.find("abcdef00"), Err(Error::Ambiguous(_))));
        assert_eq!(s.find("abcdef001").unwrap().instance.spec.name, "web");
        assert!(matches!(s.find("nosuch"), Err(Error::NotFound(_))));
        let r = s.get("abcdef0011").unwrap().unwrap();
        assert_eq!(r.intent, Some((Intent::Creating, me)));
        s.set_intent("abcdef0011", None).unwrap();
        s.set_ended("abcdef0011", Status::Exited(3), Some(3), "t", None).unwrap();
        let r = s.get("abcdef0011").unwrap().unwrap();
        assert_eq!((r.intent, r.instance.status, r.instance.exit_code), (None, Status::Exited(3), Some(3)));
        s.delete("abcdef0011").unwrap();
        assert!(s.get("abcdef0011").unwrap().is_none());
        // Reopening keeps the data and the schema version.
        drop(s);
        let s = Store::open(dir.path()).unwrap();
        assert_eq!(s.list().unwrap().len(), 1);
        let v: i64 = s.conn.query_row("PRAGMA user_version", [], |r| r.get(0)).unwrap();
        assert_eq!(v, SCHEMA_VERSION);
    }

    #[test]
    fn supervisor_claims_exclude_live_owners() {
        let dir = tempfile::tempdir().unwrap();
        let s = Store::open(dir.path()).unwrap();
        s.insert_creating(&inst("00aa", "x"), Owner::current()).unwrap();
        // pid 1 is alive and is not us: a claim fails.
        let init = Owner::of(1).unwrap();
        assert!(s.claim_supervisor("00aa", init, true).unwrap());
        assert!(!s.claim_supervisor("00aa", Owner::current(), true).unwrap());
        s.release_supervisor("00aa").unwrap();
        assert!(s.claim_supervisor("00aa", Owner::current(), true).unwrap());
        assert_eq!(s.count_restart("00aa").unwrap(), 1);
    }

    #[test]
    fn version_1_databases_are_migrated_keeping_instances() {
        let dir = tempfile::tempdir().unwrap();
        {
            // A database as version 1 wrote it, with one instance.
            let c = Connection::open(dir.path().join("isla.db")).unwrap();
            c.execute_batch(SCHEMA).unwrap();
            c.pragma_update(None, "user_version", 1).unwrap();
            let spec = serde_json::to_string(&InstanceSpec::container("old", "busybox")).unwrap();
            c.execute(
                "INSERT INTO instances (id, name, kind, spec, status, created) VALUES ('0011', 'old', 'container', ?1, 'stopped', 't')",
                params![spec],
            )
            .unwrap();
        }
        let s = Store::open(dir.path()).unwrap();
        let v: i64 = s.conn.query_row("PRAGMA user_version", [], |r| r.get(0)).unwrap();
        assert_eq!(v, SCHEMA_VERSION);
        let r = s.find("old").unwrap();
        assert_eq!((r.instance.id.as_str(), r.instance.status), ("0011", Status::Stopped));
        assert!(r.instance.spec.volumes.is_empty());
        assert!(s.volume_list().unwrap().is_empty());
        // A newer schema is refused, and the data stays.
        s.conn.pragma_update(None, "user_version", SCHEMA_VERSION + 1).unwrap();
        drop(s);
        let e = Store::open(dir.path()).err().unwrap().to_string();
        assert!(e.contains("newer than this isla understands"), "{e}");
    }

    #[test]
    fn volumes_in_use_are_not_removed() {
        let dir = tempfile::tempdir().unwrap();
        let s = Store::open(dir.path()).unwrap();
        let mut i = inst("00bb", "user");
        i.spec.volumes = vec![crate::model::Volume::named("data", "/data", false)];
        // Creating an instance records the volume it names.
        s.insert_creating(&i, Owner::current()).unwrap();
        assert_eq!(s.volume_list().unwrap().iter().map(|v| v.name.as_str()).collect::<Vec<_>>(), ["data"]);
        let (_, new) = s.volume_create("data", &Default::default(), "t").unwrap();
        assert!(!new);
        let mut called = false;
        let e = s.volume_remove("data", || {
            called = true;
            Ok(())
        });
        assert!(matches!(e, Err(Error::VolumeInUse { ref users, .. }) if users == "user"), "{e:?}");
        assert!(!called, "the files of a volume in use were touched");
        s.delete("00bb").unwrap();
        s.volume_remove("data", || Ok(())).unwrap();
        assert!(matches!(s.volume_remove("data", || Ok(())), Err(Error::NoSuchVolume(_))));
    }
}
