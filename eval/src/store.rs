//! The SQLite store of one evaluation: its samples, each sample's outcome as soon as it is known, and the
//! scores. A run that is interrupted and started again finds what is done here and does only the rest.
use std::path::{Path, PathBuf};

use rusqlite::types::{FromSql, FromSqlError, FromSqlResult, ToSqlOutput, ValueRef};
use rusqlite::{params, Connection, OptionalExtension, ToSql};

use crate::error::{EvalError, Result};
use crate::problems::Problem;
use crate::samples::Sample;
use crate::sandbox::{Outcome, Status};

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS samples (
    task_id TEXT NOT NULL, idx INTEGER NOT NULL, completion TEXT NOT NULL, raw TEXT,
    PRIMARY KEY (task_id, idx));
CREATE TABLE IF NOT EXISTS results (
    task_id TEXT NOT NULL, idx INTEGER NOT NULL, status TEXT NOT NULL, result TEXT NOT NULL, seconds REAL NOT NULL,
    PRIMARY KEY (task_id, idx));
CREATE TABLE IF NOT EXISTS problems (task_id TEXT PRIMARY KEY, n INTEGER NOT NULL, passed INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS scores (k INTEGER PRIMARY KEY, pass_at_k REAL NOT NULL);
CREATE TABLE IF NOT EXISTS problem_fingerprints (task_id TEXT PRIMARY KEY, prompt TEXT NOT NULL, program TEXT NOT NULL);
";

/// Orders ids by their text with every run of digits compared as a number.
#[derive(Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Chunk {
    Number(u128),
    Text(String),
}

fn natural_key(id: &str) -> Vec<Chunk> {
    let mut chunks = Vec::new();
    let mut rest = id;
    while let Some(first) = rest.chars().next() {
        let digit = first.is_ascii_digit();
        let end = rest.find(|c: char| c.is_ascii_digit() != digit).unwrap_or(rest.len());
        let (chunk, tail) = rest.split_at(end);
        chunks.push(match chunk.parse::<u128>() {
            Ok(number) if digit => Chunk::Number(number),
            _ => Chunk::Text(chunk.to_string()),
        });
        rest = tail;
    }
    chunks
}

/// A result's status is stored as its name.
impl ToSql for Status {
    fn to_sql(&self) -> rusqlite::Result<ToSqlOutput<'_>> {
        Ok(self.name().into())
    }
}

impl FromSql for Status {
    fn column_result(value: ValueRef<'_>) -> FromSqlResult<Self> {
        let name = value.as_str()?;
        [Status::Passed, Status::Failed, Status::TimedOut]
            .into_iter()
            .find(|status| status.name() == name)
            .ok_or_else(|| FromSqlError::Other(format!("unknown result status {name:?}").into()))
    }
}

/// Where a store's samples come from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SampleSource {
    /// A model makes them from the problems' prompts (`eval run`).
    Model,
    /// A samples file gives them (`eval score`).
    File,
}

/// What a benchmark file changed since a store last used it, by task id.
#[derive(Debug, Default, PartialEq)]
pub struct Changes {
    /// Problems whose prompt changed, where a model makes the samples: samples and outcomes forgotten.
    pub prompts: Vec<String>,
    /// Problems whose program changed (its tests): outcomes forgotten.
    pub programs: Vec<String>,
}

impl Changes {
    /// Whether nothing changed.
    pub fn is_empty(&self) -> bool {
        self.prompts.is_empty() && self.programs.is_empty()
    }
}

/// An open evaluation database.
pub struct Store {
    connection: Connection,
    path: PathBuf,
    /// Held while an evaluation has the store open: two never write it at once.
    _lock: Option<std::fs::File>,
}

/// A sample with its outcome, if it has one.
pub type Scored = (Sample, Option<Outcome>);

impl Store {
    /// Opens (or creates) the store of an evaluation of `benchmark`; a store made for another benchmark is
    /// an error.
    pub fn open(path: &Path, benchmark: &str) -> Result<Store> {
        Store::open_with(path, benchmark, true)
    }

    /// [`open`](Self::open), holding the store against other evaluations when `exclusive`.
    fn open_with(path: &Path, benchmark: &str, exclusive: bool) -> Result<Store> {
        let error = |e: rusqlite::Error| EvalError::Store { path: path.into(), message: e.to_string() };
        let connection = Connection::open(path).map_err(error)?;
        connection.busy_timeout(std::time::Duration::from_secs(10)).map_err(error)?;
        connection.pragma_update(None, "journal_mode", "WAL").map_err(error)?;
        connection.pragma_update(None, "synchronous", "NORMAL").map_err(error)?;
        connection.execute_batch(SCHEMA).map_err(error)?;
        // One evaluation at a time: two would replace each other's samples under their outcomes.
        let lock = if exclusive {
            let lock = std::fs::File::open(path)
                .map_err(|e| EvalError::Store { path: path.into(), message: e.to_string() })?;
            if let Err(std::fs::TryLockError::WouldBlock) = lock.try_lock() {
                let message = "another evaluation is using it: wait for it to end, or use another store".to_string();
                return Err(EvalError::Store { path: path.into(), message });
            }
            Some(lock)
        } else {
            None
        };
        let store = Store { connection, path: path.into(), _lock: lock };
        match store.meta("benchmark")? {
            Some(found) if found != benchmark => {
                return Err(store.error(format!(
                    "it holds a {found} evaluation, not {benchmark}; use another store (--db, or --out for eval run)"
                )))
            }
            Some(_) => {}
            None => store.set_meta("benchmark", benchmark)?,
        }
        Ok(store)
    }

    /// Opens an existing store, whatever its benchmark.
    pub fn open_existing(path: &Path) -> Result<Store> {
        if !path.is_file() {
            return Err(EvalError::Store { path: path.into(), message: "no such evaluation store".into() });
        }
        let connection =
            Connection::open(path).map_err(|e| EvalError::Store { path: path.into(), message: e.to_string() })?;
        let benchmark: Option<String> = connection
            .query_row("SELECT value FROM meta WHERE key = 'benchmark'", [], |row| row.get(0))
            .optional()
            .map_err(|e| EvalError::Store { path: path.into(), message: format!("not an evaluation store ({e})") })?;
        drop(connection);
        match benchmark {
            // Reading (a report while an evaluation runs) takes no hold.
            Some(benchmark) => Store::open_with(path, &benchmark, false),
            None => {
                Err(EvalError::Store { path: path.into(), message: "not an evaluation store (no benchmark)".into() })
            }
        }
    }

    /// The database file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    fn error(&self, message: String) -> EvalError {
        EvalError::Store { path: self.path.clone(), message }
    }

    fn sql<T>(&self, result: rusqlite::Result<T>) -> Result<T> {
        result.map_err(|e| self.error(e.to_string()))
    }

    /// A metadata value.
    pub fn meta(&self, key: &str) -> Result<Option<String>> {
        self.sql(self.connection.query_row("SELECT value FROM meta WHERE key = ?1", [key], |row| row.get(0)).optional())
    }

    /// Sets a metadata value.
    pub fn set_meta(&self, key: &str, value: &str) -> Result<()> {
        self.sql(self.connection.execute("INSERT OR REPLACE INTO meta (key, value) VALUES (?1, ?2)", [key, value]))
            .map(drop)
    }

    /// Makes the stored samples exactly `samples`: new ones are added, changed ones lose their outcome, and
    /// ones no longer present are removed. Returns how many outcomes are kept.
    pub fn replace_samples(&mut self, samples: &[Sample]) -> Result<usize> {
        let path = self.path.clone();
        let error = |e: rusqlite::Error| EvalError::Store { path: path.clone(), message: e.to_string() };
        let tx = self.connection.transaction().map_err(error)?;
        tx.execute_batch(
            "CREATE TEMP TABLE incoming (task_id TEXT, idx INTEGER, completion TEXT, PRIMARY KEY (task_id, idx))",
        )
        .map_err(error)?;
        {
            let mut insert = tx.prepare("INSERT INTO incoming VALUES (?1, ?2, ?3)").map_err(error)?;
            for sample in samples {
                insert.execute(params![sample.task_id, sample.index as i64, sample.completion]).map_err(error)?;
            }
        }
        tx.execute_batch(
            "DELETE FROM results WHERE NOT EXISTS (SELECT 1 FROM incoming i JOIN samples s USING (task_id, idx)
                 WHERE i.task_id = results.task_id AND i.idx = results.idx AND i.completion = s.completion);
             DELETE FROM samples;
             INSERT INTO samples (task_id, idx, completion) SELECT task_id, idx, completion FROM incoming;
             DROP TABLE temp.incoming;",
        )
        .map_err(error)?;
        let kept = tx.query_row("SELECT COUNT(*) FROM results", [], |row| row.get::<_, i64>(0)).map_err(error)?;
        tx.commit().map_err(error)?;
        Ok(kept as usize)
    }

    /// Adds generated samples of one problem (and the raw model output they were extracted from) at once.
    pub fn add_samples(&mut self, samples: &[(Sample, String)]) -> Result<()> {
        let path = self.path.clone();
        let error = |e: rusqlite::Error| EvalError::Store { path: path.clone(), message: e.to_string() };
        let tx = self.connection.transaction().map_err(error)?;
        {
            let mut insert = tx
                .prepare("INSERT OR REPLACE INTO samples (task_id, idx, completion, raw) VALUES (?1, ?2, ?3, ?4)")
                .map_err(error)?;
            for (sample, raw) in samples {
                insert.execute(params![sample.task_id, sample.index as i64, sample.completion, raw]).map_err(error)?;
            }
        }
        tx.commit().map_err(error)
    }

    /// Whether any sample is stored.
    pub fn holds_samples(&self) -> Result<bool> {
        self.sql(self.connection.query_row("SELECT EXISTS (SELECT 1 FROM samples)", [], |row| row.get(0)))
    }

    /// How many samples of `task_id` are stored.
    pub fn sample_count(&self, task_id: &str) -> Result<usize> {
        self.sql(
            self.connection
                .query_row("SELECT COUNT(*) FROM samples WHERE task_id = ?1", [task_id], |row| row.get::<_, i64>(0)),
        )
        .map(|n| n as usize)
    }

    /// Every sample with its outcome, by task (in natural order: `HumanEval/2` before `HumanEval/10`)
    /// and index, whatever order they were generated in (batches finish problems out of order).
    pub fn scored(&self) -> Result<Vec<Scored>> {
        let mut statement = self.sql(self.connection.prepare(
            "SELECT s.task_id, s.idx, s.completion, r.status, r.result, r.seconds
             FROM samples s LEFT JOIN results r USING (task_id, idx) ORDER BY s.rowid",
        ))?;
        let rows = statement.query_map([], |row| {
            let sample =
                Sample { task_id: row.get(0)?, index: row.get::<_, i64>(1)? as usize, completion: row.get(2)? };
            let status: Option<Status> = row.get(3)?;
            let outcome = match status {
                Some(status) => Some(Outcome { status, result: row.get(4)?, seconds: row.get(5)? }),
                None => None,
            };
            Ok((sample, outcome))
        });
        let rows = self.sql(rows)?;
        let mut scored: Vec<Scored> = self.sql(rows.collect())?;
        scored.sort_by_cached_key(|(sample, _)| (natural_key(&sample.task_id), sample.index));
        Ok(scored)
    }

    /// Forgets every outcome (and the scores made of them): the samples run again.
    pub fn forget_outcomes(&self) -> Result<usize> {
        self.sql(self.connection.execute_batch("DELETE FROM problems; DELETE FROM scores;"))?;
        self.sql(self.connection.execute("DELETE FROM results", []))
    }

    /// Compares each problem of the benchmark file with what the store recorded when it last used
    /// it (problems seen first are recorded; a store older than the record trusts what it holds): a
    /// changed program forgets the problem's outcomes, so its samples run again; where the store's
    /// samples are made by a model (`eval run`), a changed prompt forgets its samples too. Problems
    /// the file lacks keep theirs (a subset of a benchmark may share its store).
    pub fn forget_changed_problems(&mut self, problems: &[Problem], samples: SampleSource) -> Result<Changes> {
        let path = self.path.clone();
        let error = |e: rusqlite::Error| EvalError::Store { path: path.clone(), message: e.to_string() };
        let tx = self.connection.transaction().map_err(error)?;
        let mut changes = Changes::default();
        {
            let mut stored =
                tx.prepare("SELECT prompt, program FROM problem_fingerprints WHERE task_id = ?1").map_err(error)?;
            let mut record = tx
                .prepare("INSERT OR REPLACE INTO problem_fingerprints (task_id, prompt, program) VALUES (?1, ?2, ?3)")
                .map_err(error)?;
            let mut forget_outcomes = tx.prepare("DELETE FROM results WHERE task_id = ?1").map_err(error)?;
            let mut forget_samples = tx.prepare("DELETE FROM samples WHERE task_id = ?1").map_err(error)?;
            for problem in problems {
                let id = &problem.task_id;
                let now = (problem.prompt_fingerprint(), problem.program_fingerprint());
                let before: Option<(String, String)> =
                    stored.query_row([id], |row| Ok((row.get(0)?, row.get(1)?))).optional().map_err(error)?;
                let Some(before) = before.filter(|before| *before != now) else {
                    record.execute(params![id, now.0, now.1]).map_err(error)?;
                    continue;
                };
                if samples == SampleSource::Model && before.0 != now.0 {
                    forget_samples.execute([id]).map_err(error)?;
                    forget_outcomes.execute([id]).map_err(error)?;
                    changes.prompts.push(id.clone());
                } else if before.1 != now.1 {
                    forget_outcomes.execute([id]).map_err(error)?;
                    changes.programs.push(id.clone());
                }
                record.execute(params![id, now.0, now.1]).map_err(error)?;
            }
        }
        if !changes.is_empty() {
            tx.execute_batch("DELETE FROM problems; DELETE FROM scores;").map_err(error)?;
        }
        tx.commit().map_err(error)?;
        Ok(changes)
    }

    /// Records a sample's outcome (committed at once, so an interruption loses nothing done).
    pub fn record(&self, sample: &Sample, outcome: &Outcome) -> Result<()> {
        self.sql(self.connection.execute(
            "INSERT OR REPLACE INTO results (task_id, idx, status, result, seconds) VALUES (?1, ?2, ?3, ?4, ?5)",
            params![sample.task_id, sample.index as i64, outcome.status, outcome.result, outcome.seconds],
        ))
        .map(drop)
    }

    /// Replaces the per-problem counts and the pass@k scores.
    pub fn save_scores(&mut self, problems: &[(String, usize, usize)], scores: &[(usize, f64)]) -> Result<()> {
        let path = self.path.clone();
        let error = |e: rusqlite::Error| EvalError::Store { path: path.clone(), message: e.to_string() };
        let tx = self.connection.transaction().map_err(error)?;
        tx.execute_batch("DELETE FROM problems; DELETE FROM scores;").map_err(error)?;
        for (task_id, n, passed) in problems {
            tx.execute("INSERT INTO problems VALUES (?1, ?2, ?3)", params![task_id, *n as i64, *passed as i64])
                .map_err(error)?;
        }
        for (k, value) in scores {
            tx.execute("INSERT INTO scores VALUES (?1, ?2)", params![*k as i64, value]).map_err(error)?;
        }
        tx.commit().map_err(error)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Samples read back by task in natural order and by index, not in the order they were stored.
    #[test]
    fn samples_read_back_in_problem_order() {
        let dir = tempfile::tempdir().unwrap();
        let mut store = Store::open(&dir.path().join("eval.sqlite"), "humaneval").unwrap();
        let sample = |task: &str, index| Sample { task_id: task.into(), index, completion: String::new() };
        let stored = [sample("HumanEval/10", 1), sample("HumanEval/10", 0), sample("HumanEval/2", 0), sample("11", 0)];
        store.replace_samples(&stored).unwrap();
        let order: Vec<(String, usize)> =
            store.scored().unwrap().into_iter().map(|(s, _)| (s.task_id, s.index)).collect();
        let expected = [("11", 0), ("HumanEval/2", 0), ("HumanEval/10", 0), ("HumanEval/10", 1)];
        assert_eq!(order, expected.map(|(t, i)| (t.to_string(), i)));
    }

    /// Outcomes are stored with their status by name and read back; an unknown name is an error.
    #[test]
    fn statuses_round_trip_by_name() {
        let dir = tempfile::tempdir().unwrap();
        let mut store = Store::open(&dir.path().join("eval.sqlite"), "humaneval").unwrap();
        let sample = Sample { task_id: "T/0".into(), index: 0, completion: "pass".into() };
        store.replace_samples(std::slice::from_ref(&sample)).unwrap();
        for status in [Status::Passed, Status::Failed, Status::TimedOut] {
            let outcome = Outcome { status, result: status.name().into(), seconds: 0.5 };
            store.record(&sample, &outcome).unwrap();
            assert_eq!(store.scored().unwrap(), [(sample.clone(), Some(outcome))]);
        }
        store.connection.execute("UPDATE results SET status = 'lost'", []).unwrap();
        let error = store.scored().unwrap_err().to_string();
        assert!(error.contains("unknown result status \"lost\""), "{error}");
    }
}
