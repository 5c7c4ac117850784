//! The pipeline's stage table in SQLite: per stage, the fingerprint of the configuration it was run
//! with (its own section plus its inputs' fingerprints), its status and its outputs as JSON.
use std::path::{Path, PathBuf};

use anyhow::Context;
use rusqlite::{params, Connection, OptionalExtension};
use serde_json::Value;

pub struct State {
    conn: Connection,
}

/// Where a stage stands, stored as its name in the `status` column.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Status {
    Running,
    Done,
    Failed,
}

impl Status {
    fn as_str(self) -> &'static str {
        match self {
            Status::Running => "running",
            Status::Done => "done",
            Status::Failed => "failed",
        }
    }

    fn parse(text: &str) -> anyhow::Result<Status> {
        [Status::Running, Status::Done, Status::Failed]
            .into_iter()
            .find(|status| status.as_str() == text)
            .with_context(|| format!("unknown stage status `{text}` in the stage table"))
    }
}

impl rusqlite::ToSql for Status {
    fn to_sql(&self) -> rusqlite::Result<rusqlite::types::ToSqlOutput<'_>> {
        self.as_str().to_sql()
    }
}

/// What to do with a stage, given what the table holds.
#[derive(Debug, PartialEq)]
pub enum Plan {
    /// Done with this fingerprint: reuse its outputs.
    Skip(Value),
    /// Started (or failed) with this fingerprint: the stage's own resumption continues it.
    Resume,
    /// Never run, or run with another configuration: start from nothing.
    Fresh,
}

/// A stable 64-bit FNV-1a hash, as hex: the same text gives the same fingerprint on every machine.
pub fn fingerprint(parts: &[&str]) -> String {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for part in parts {
        for byte in part.bytes().chain([0u8]) {
            hash ^= u64::from(byte);
            hash = hash.wrapping_mul(0x0000_0100_0000_01b3);
        }
    }
    format!("{hash:016x}")
}

/// What `paths` name and hold, as a fingerprint: each path, and every file under them (directories
/// walked in name order) with its size and modification time, as make and cargo judge freshness, so that an edited input
/// re-runs its stages without hashing gigabytes of checkpoints. A missing path counts as missing;
/// hidden entries and Python's bytecode caches (which importing the stdlib may write) do not count.
pub fn files_fingerprint(paths: &[PathBuf]) -> String {
    fn walk(path: &Path, lines: &mut Vec<String>) {
        let Ok(meta) = std::fs::metadata(path) else {
            lines.push(format!("{}\tmissing", path.display()));
            return;
        };
        if meta.is_dir() {
            let mut entries: Vec<PathBuf> = std::fs::read_dir(path)
                .into_iter()
                .flatten()
                .flatten()
                .filter(|e| {
                    let name = e.file_name();
                    let name = name.to_string_lossy();
                    !(name.starts_with('.') || name == "__pycache__" || name.ends_with(".pyc"))
                })
                .map(|e| e.path())
                .collect();
            entries.sort();
            for entry in entries {
                walk(&entry, lines);
            }
        } else {
            let modified = meta.modified().ok().and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok());
            let nanos = modified.map_or(0, |d| d.as_nanos());
            lines.push(format!("{}\t{}\t{nanos}", path.display(), meta.len()));
        }
    }
    let mut lines = Vec::new();
    for path in paths {
        lines.push(path.display().to_string());
        walk(path, &mut lines);
    }
    fingerprint(&lines.iter().map(String::as_str).collect::<Vec<_>>())
}

fn now_ms() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_millis() as i64).unwrap_or(0)
}

impl State {
    pub fn open(path: &Path) -> anyhow::Result<State> {
        let conn = Connection::open(path).with_context(|| format!("cannot open {}", path.display()))?;
        conn.execute_batch(
            "PRAGMA journal_mode = WAL;
             CREATE TABLE IF NOT EXISTS stages (
                 name TEXT PRIMARY KEY,
                 fingerprint TEXT NOT NULL,
                 status TEXT NOT NULL CHECK (status IN ('running', 'done', 'failed')),
                 outputs TEXT,
                 error TEXT,
                 started_at INTEGER NOT NULL,
                 finished_at INTEGER,
                 pid INTEGER
             );",
        )
        .with_context(|| format!("cannot set up {}", path.display()))?;
        // Tables made before the `pid` column existed get it.
        let has_pid: i64 =
            conn.query_row("SELECT count(*) FROM pragma_table_info('stages') WHERE name = 'pid'", [], |row| {
                row.get(0)
            })?;
        if has_pid == 0 {
            conn.execute_batch("ALTER TABLE stages ADD COLUMN pid INTEGER")?;
        }
        Ok(State { conn })
    }

    pub fn plan(&self, name: &str, fingerprint: &str) -> anyhow::Result<Plan> {
        let row: Option<(String, String, Option<String>)> = self
            .conn
            .query_row("SELECT fingerprint, status, outputs FROM stages WHERE name = ?1", [name], |row| {
                Ok((row.get(0)?, row.get(1)?, row.get(2)?))
            })
            .optional()?;
        let Some((stored, status, outputs)) = row else {
            return Ok(Plan::Fresh);
        };
        Ok(match (Status::parse(&status)?, outputs) {
            _ if stored != fingerprint => Plan::Fresh,
            (Status::Done, Some(outputs)) => Plan::Skip(serde_json::from_str(&outputs)?),
            _ => Plan::Resume,
        })
    }

    pub fn start(&self, name: &str, fingerprint: &str) -> anyhow::Result<()> {
        self.conn.execute(
            "INSERT INTO stages (name, fingerprint, status, started_at) VALUES (?1, ?2, ?4, ?3)
             ON CONFLICT (name) DO UPDATE SET fingerprint = ?2, status = ?4, outputs = NULL, error = NULL,
                                            started_at = ?3, finished_at = NULL, pid = NULL",
            params![name, fingerprint, now_ms(), Status::Running],
        )?;
        Ok(())
    }

    pub fn finish(&self, name: &str, outputs: &Value) -> anyhow::Result<()> {
        self.conn.execute(
            "UPDATE stages SET status = ?4, outputs = ?2, finished_at = ?3 WHERE name = ?1",
            params![name, outputs.to_string(), now_ms(), Status::Done],
        )?;
        Ok(())
    }

    pub fn fail(&self, name: &str, error: &str) -> anyhow::Result<()> {
        self.conn.execute(
            "UPDATE stages SET status = ?4, error = ?2, finished_at = ?3 WHERE name = ?1",
            params![name, error, now_ms(), Status::Failed],
        )?;
        Ok(())
    }

    /// Records the child process a running stage started.
    pub fn set_pid(&self, name: &str, pid: u32) -> anyhow::Result<()> {
        self.conn.execute("UPDATE stages SET pid = ?2 WHERE name = ?1", params![name, pid])?;
        Ok(())
    }

    /// Stages marked running whose recorded child process is still alive as this same program:
    /// a pipeline killed without its process group leaves such a child behind.
    pub fn orphans(&self, exe: &Path) -> anyhow::Result<Vec<(String, u32)>> {
        let mut statement = self.conn.prepare("SELECT name, pid FROM stages WHERE status = ?1 AND pid IS NOT NULL")?;
        let rows =
            statement.query_map([Status::Running], |row| Ok((row.get::<_, String>(0)?, row.get::<_, u32>(1)?)))?;
        let exe = std::fs::canonicalize(exe).unwrap_or_else(|_| exe.to_path_buf());
        let mut alive = Vec::new();
        for row in rows {
            let (name, pid) = row?;
            let running = std::fs::read_link(format!("/proc/{pid}/exe"))
                .map(|p| p == exe || p.to_string_lossy().trim_end_matches(" (deleted)") == exe.to_string_lossy())
                .unwrap_or(false);
            if running {
                alive.push((name, pid));
            }
        }
        Ok(alive)
    }
}
