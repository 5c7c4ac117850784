//! The SQLite store (WAL): runs, rounds, items and every backend answer. Each answer is written in
//! the same transaction as the item column it fills, so progress is never marked before the answer
//! is safe, and a killed run resumes without asking again.
use std::collections::BTreeMap;
use std::path::Path;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rand::SeedableRng;
use rusqlite::types::{FromSql, FromSqlError, FromSqlResult, ToSqlOutput, ValueRef};
use rusqlite::{params, Connection, OptionalExtension, ToSql};

use crate::backend::Reply;
use crate::clean::{Decontaminator, Deduper};
use crate::prompts::{question, Method};
use crate::rules::Rejection;
use crate::seeds::Seed;
use crate::{EvolveError, Result};

/// The schema this build writes; a database with a higher `user_version` is refused.
pub const SCHEMA_VERSION: i64 = 1;

const SCHEMA: &str = "
CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE runs (id INTEGER PRIMARY KEY, started_at INTEGER NOT NULL, settings TEXT NOT NULL);
CREATE TABLE rounds (round INTEGER PRIMARY KEY, planned_at INTEGER NOT NULL, finished_at INTEGER);
CREATE TABLE items (
    id INTEGER PRIMARY KEY,
    parent_id INTEGER REFERENCES items(id),
    root_id INTEGER NOT NULL,
    round INTEGER NOT NULL,
    method TEXT NOT NULL,
    instruction TEXT,
    input TEXT NOT NULL DEFAULT '',
    verdict TEXT,
    response TEXT,
    finish TEXT,
    status TEXT NOT NULL,
    reason TEXT,
    detail TEXT,
    backend TEXT,
    model TEXT,
    prompt_tokens INTEGER NOT NULL DEFAULT 0,
    completion_tokens INTEGER NOT NULL DEFAULT 0,
    latency_ms INTEGER NOT NULL DEFAULT 0,
    created_at INTEGER NOT NULL,
    updated_at INTEGER NOT NULL
);
CREATE INDEX items_by_round ON items (round, status);
CREATE INDEX items_by_root ON items (root_id, status, round);
CREATE TABLE answers (
    item_id INTEGER NOT NULL REFERENCES items(id),
    stage TEXT NOT NULL,
    prompt TEXT NOT NULL,
    answer TEXT NOT NULL,
    finish TEXT NOT NULL,
    backend TEXT NOT NULL,
    model TEXT NOT NULL,
    prompt_tokens INTEGER NOT NULL,
    completion_tokens INTEGER NOT NULL,
    latency_ms INTEGER NOT NULL,
    attempts INTEGER NOT NULL,
    seed INTEGER NOT NULL,
    created_at INTEGER NOT NULL,
    PRIMARY KEY (item_id, stage)
);
";

fn now_ms() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as i64)
}

/// A request made for an item.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stage {
    /// Rewrite the parent by the item's method.
    Evolve,
    /// Judge whether the rewrite equals the parent.
    Judge,
    /// Answer the instruction.
    Respond,
}

impl Stage {
    /// The name stored in `answers.stage`.
    pub fn name(self) -> &'static str {
        match self {
            Stage::Evolve => "evolve",
            Stage::Judge => "judge",
            Stage::Respond => "respond",
        }
    }
}

/// Where an item is in its round.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Status {
    /// Not yet through the backend.
    Pending,
    /// Through the rules, waiting for clean-up.
    Passed,
    /// Eliminated by a rule.
    Rejected,
    /// Kept by clean-up.
    Accepted,
    /// Removed by dedup or decontamination.
    Removed,
}

impl Status {
    const ALL: [Status; 5] = [Status::Pending, Status::Passed, Status::Rejected, Status::Accepted, Status::Removed];

    /// The name stored in `items.status`.
    pub fn as_str(self) -> &'static str {
        match self {
            Status::Pending => "pending",
            Status::Passed => "passed",
            Status::Rejected => "rejected",
            Status::Accepted => "accepted",
            Status::Removed => "removed",
        }
    }
}

impl std::fmt::Display for Status {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl ToSql for Status {
    fn to_sql(&self) -> rusqlite::Result<ToSqlOutput<'_>> {
        Ok(self.as_str().into())
    }
}

impl FromSql for Status {
    fn column_result(value: ValueRef<'_>) -> FromSqlResult<Self> {
        let name = value.as_str()?;
        Status::ALL
            .into_iter()
            .find(|status| status.as_str() == name)
            .ok_or_else(|| FromSqlError::Other(format!("unknown item status {name:?}").into()))
    }
}

/// An item still to be processed, with whatever answers it already has.
#[derive(Debug, Clone)]
pub struct Work {
    /// Item id.
    pub id: i64,
    /// Round.
    pub round: u32,
    /// Evolution method (`seed` in round 0).
    pub method: String,
    /// The parent's question (instruction plus input); `None` for seeds.
    pub parent: Option<String>,
    /// The instruction, once evolved.
    pub instruction: Option<String>,
    /// The input (seeds only).
    pub input: String,
    /// The judge's verdict name, once judged.
    pub verdict: Option<String>,
    /// The response and its finish reason, once answered.
    pub response: Option<(String, String)>,
}

/// One item as stored.
#[derive(Debug, Clone, PartialEq)]
pub struct Item {
    /// Id.
    pub id: i64,
    /// Parent id (none for seeds).
    pub parent_id: Option<i64>,
    /// The seed it descends from.
    pub root_id: i64,
    /// Round.
    pub round: u32,
    /// Method.
    pub method: String,
    /// Instruction.
    pub instruction: Option<String>,
    /// Input.
    pub input: String,
    /// Verdict of the equality judge.
    pub verdict: Option<String>,
    /// Response.
    pub response: Option<String>,
    /// Its [`Status`], by name.
    pub status: Status,
    /// Rejection or removal reason code.
    pub reason: Option<String>,
    /// Its particulars.
    pub detail: Option<String>,
}

/// Per-round counts for `wizard evolve status`.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct RoundStats {
    /// Round.
    pub round: u32,
    /// Whether clean-up ran and the round is closed.
    pub finished: bool,
    /// Items in the round.
    pub items: u64,
    /// Not yet through the backend.
    pub pending: u64,
    /// Through the rules, waiting for clean-up.
    pub passed: u64,
    /// Kept.
    pub accepted: u64,
    /// Eliminated by a rule.
    pub rejected: u64,
    /// Removed by dedup or decontamination.
    pub removed: u64,
    /// Count per reason code.
    pub reasons: BTreeMap<String, u64>,
    /// Judge answers that were neither `Equal` nor `Not Equal`.
    pub unclear_verdicts: u64,
    /// Mean words per instruction of accepted items.
    pub instruction_words: f64,
    /// Mean words per response of accepted items.
    pub response_words: f64,
    /// Prompt tokens over all requests.
    pub prompt_tokens: u64,
    /// Completion tokens over all requests.
    pub completion_tokens: u64,
    /// Mean request latency in milliseconds.
    pub mean_latency_ms: f64,
}

/// The database.
pub struct Store {
    conn: Connection,
    path: String,
}

impl Store {
    /// Opens or creates a store; refuses a database from a newer schema.
    pub fn open(path: &Path) -> Result<Store> {
        let conn = Connection::open(path)?;
        conn.busy_timeout(Duration::from_secs(10))?;
        let display = path.display().to_string();
        let version: i64 = conn.query_row("PRAGMA user_version", [], |row| row.get(0))?;
        if version > SCHEMA_VERSION {
            return Err(EvolveError::NewerSchema { path: display, found: version, supported: SCHEMA_VERSION });
        }
        conn.pragma_update(None, "journal_mode", "WAL")?;
        // NORMAL in WAL mode survives a killed process; only a power cut may lose the last commits.
        conn.pragma_update(None, "synchronous", "NORMAL")?;
        conn.pragma_update(None, "foreign_keys", "ON")?;
        if version == 0 {
            let tables: i64 = conn.query_row("SELECT count(*) FROM sqlite_master", [], |row| row.get(0))?;
            if tables > 0 {
                return Err(EvolveError::Invalid(format!(
                    "{display} is a SQLite database, but not one of wizard evolve"
                )));
            }
            conn.execute_batch(&format!("BEGIN; {SCHEMA} PRAGMA user_version = {SCHEMA_VERSION}; COMMIT;"))?;
        }
        Ok(Store { conn, path: display })
    }

    /// The file.
    pub fn path(&self) -> &str {
        &self.path
    }

    /// Records a run (a start or a resume) and checks that the seed matches the database's; returns
    /// the settings of the run before it, if any.
    pub fn begin_run(&mut self, seed: u64, settings: &str) -> Result<Option<String>> {
        let tx = self.conn.transaction()?;
        let last: Option<String> =
            tx.query_row("SELECT settings FROM runs ORDER BY id DESC LIMIT 1", [], |row| row.get(0)).optional()?;
        let stored: Option<String> =
            tx.query_row("SELECT value FROM meta WHERE key = 'seed'", [], |row| row.get(0)).optional()?;
        match stored {
            Some(stored) if stored != seed.to_string() => {
                return Err(EvolveError::Mismatch { what: "--seed", stored, requested: seed.to_string() });
            }
            Some(_) => {}
            None => {
                tx.execute("INSERT INTO meta (key, value) VALUES ('seed', ?1)", [seed.to_string()])?;
            }
        }
        tx.execute("INSERT INTO runs (started_at, settings) VALUES (?1, ?2)", params![now_ms(), settings])?;
        tx.commit()?;
        Ok(last)
    }

    /// Whether the round has items (it was planned).
    pub fn planned(&self, round: u32) -> Result<bool> {
        Ok(self.conn.query_row("SELECT count(*) FROM rounds WHERE round = ?1", [round], |row| row.get::<_, i64>(0))?
            > 0)
    }

    /// Whether the round's clean-up ran.
    pub fn finished(&self, round: u32) -> Result<bool> {
        let finished: Option<Option<i64>> = self
            .conn
            .query_row("SELECT finished_at FROM rounds WHERE round = ?1", [round], |row| row.get(0))
            .optional()?;
        Ok(matches!(finished, Some(Some(_))))
    }

    /// Writes the seeds as round 0, in one transaction. Seeds with an output need no request.
    pub fn import_seeds(&mut self, seeds: &[Seed]) -> Result<()> {
        let tx = self.conn.transaction()?;
        let now = now_ms();
        for seed in seeds {
            let status = if seed.output.is_some() { Status::Passed } else { Status::Pending };
            tx.execute(
                "INSERT INTO items (root_id, round, method, instruction, input, response, finish, status, created_at, updated_at)
                 VALUES (0, 0, 'seed', ?1, ?2, ?3, 'seed', ?4, ?5, ?5)",
                params![seed.instruction, seed.input, seed.output, status, now],
            )?;
            let id = tx.last_insert_rowid();
            tx.execute("UPDATE items SET root_id = ?1 WHERE id = ?1", [id])?;
        }
        tx.execute("INSERT INTO rounds (round, planned_at) VALUES (0, ?1)", [now])?;
        tx.commit()?;
        Ok(())
    }

    /// Gives every live lineage one child in `round`: the lineage's latest accepted item is the
    /// parent, so a rejected child leaves its parent live. Methods are drawn from `seed`, the
    /// lineage and the round, so they do not depend on order or on restarts. Returns the count.
    pub fn plan_round(&mut self, round: u32, seed: u64) -> Result<usize> {
        let tx = self.conn.transaction()?;
        let parents: Vec<(i64, i64)> = {
            let mut statement = tx.prepare(
                "SELECT id, root_id FROM items AS i WHERE status = ?2 AND round = (
                     SELECT max(round) FROM items AS j WHERE j.root_id = i.root_id AND j.status = ?2 AND j.round < ?1)
                 ORDER BY root_id",
            )?;
            let rows = statement.query_map(params![round, Status::Accepted], |row| Ok((row.get(0)?, row.get(1)?)))?;
            rows.collect::<rusqlite::Result<_>>()?
        };
        let now = now_ms();
        for &(parent, root) in &parents {
            let mix = seed ^ (root as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ u64::from(round).rotate_left(32);
            let method = Method::pick(&mut rand::rngs::StdRng::seed_from_u64(mix));
            tx.execute(
                "INSERT INTO items (parent_id, root_id, round, method, status, created_at, updated_at)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?6)",
                params![parent, root, round, method.name(), Status::Pending, now],
            )?;
        }
        tx.execute("INSERT INTO rounds (round, planned_at) VALUES (?1, ?2)", params![round, now])?;
        tx.commit()?;
        Ok(parents.len())
    }

    /// Items of `round` still pending, with their stored answers.
    pub fn pending(&self, round: u32) -> Result<Vec<Work>> {
        let mut statement = self.conn.prepare(
            "SELECT i.id, i.method, p.instruction, p.input, i.instruction, i.input, i.verdict, i.response, i.finish
             FROM items AS i LEFT JOIN items AS p ON p.id = i.parent_id
             WHERE i.round = ?1 AND i.status = ?2 ORDER BY i.id",
        )?;
        let rows = statement.query_map(params![round, Status::Pending], |row| {
            let parent: Option<String> = row.get(2)?;
            let parent_input: Option<String> = row.get(3)?;
            let response: Option<String> = row.get(7)?;
            let finish: Option<String> = row.get(8)?;
            Ok(Work {
                id: row.get(0)?,
                round,
                method: row.get(1)?,
                parent: parent.map(|p| question(&p, &parent_input.unwrap_or_default())),
                instruction: row.get(4)?,
                input: row.get(5)?,
                verdict: row.get(6)?,
                response: response.map(|r| (r, finish.unwrap_or_default())),
            })
        })?;
        Ok(rows.collect::<rusqlite::Result<_>>()?)
    }

    /// Stores an answer and the item column it fills, in one transaction. `value` is what goes
    /// into the item (the verdict's name for the judge stage; the text otherwise).
    pub fn save_answer(
        &mut self,
        item: i64,
        stage: Stage,
        prompt: &str,
        reply: &Reply,
        value: &str,
        answer: Answer,
    ) -> Result<()> {
        let tx = self.conn.transaction()?;
        tx.execute(
            "INSERT INTO answers (item_id, stage, prompt, answer, finish, backend, model, prompt_tokens,
                                  completion_tokens, latency_ms, attempts, seed, created_at)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13)",
            params![
                item,
                stage.name(),
                prompt,
                reply.text,
                reply.finish,
                answer.backend,
                answer.model,
                reply.prompt_tokens as i64,
                reply.completion_tokens as i64,
                answer.latency.as_millis() as i64,
                reply.attempts,
                answer.seed as i64,
                now_ms()
            ],
        )?;
        // The item takes the rest of its column and its usage from the answer row just written.
        let column = match stage {
            Stage::Evolve => "instruction = ?2, backend = a.backend, model = a.model",
            Stage::Judge => "verdict = ?2",
            Stage::Respond => {
                "response = ?2, finish = a.finish, backend = coalesce(items.backend, a.backend),
                 model = coalesce(items.model, a.model)"
            }
        };
        tx.execute(
            &format!(
                "UPDATE items SET {column}, prompt_tokens = items.prompt_tokens + a.prompt_tokens,
                 completion_tokens = items.completion_tokens + a.completion_tokens,
                 latency_ms = items.latency_ms + a.latency_ms, updated_at = a.created_at
                 FROM answers AS a WHERE items.id = ?1 AND a.item_id = ?1 AND a.stage = ?3"
            ),
            params![item, value, stage.name()],
        )?;
        tx.commit()?;
        Ok(())
    }

    /// Ends an item's processing: `passed` (waiting for clean-up) or `rejected` with the reason.
    pub fn finish_item(&mut self, item: i64, rejection: Option<&Rejection>) -> Result<()> {
        let status = if rejection.is_some() { Status::Rejected } else { Status::Passed };
        self.conn.execute(
            "UPDATE items SET status = ?2, reason = ?3, detail = ?4, updated_at = ?5 WHERE id = ?1 AND status = ?6",
            params![
                item,
                status,
                rejection.map(|r| r.reason),
                rejection.map(|r| r.detail.as_str()),
                now_ms(),
                Status::Pending
            ],
        )?;
        Ok(())
    }

    /// Clean-up of a round in one transaction: every passed item is checked for benchmark
    /// contamination, then for exact and near-duplicates of everything accepted so far (in id
    /// order); it becomes `accepted` or `removed` with the reason, and the round is closed.
    pub fn clean_round(&mut self, round: u32, decontaminator: &Decontaminator) -> Result<()> {
        let tx = self.conn.transaction()?;
        let mut deduper = Deduper::default();
        {
            let mut kept =
                tx.prepare("SELECT id, root_id, instruction, input FROM items WHERE status = ?1 ORDER BY id")?;
            let rows = kept.query_map([Status::Accepted], |row| {
                Ok((row.get::<_, i64>(0)?, row.get::<_, i64>(1)?, row.get::<_, String>(2)?, row.get::<_, String>(3)?))
            })?;
            for row in rows {
                let (id, root, instruction, input) = row?;
                deduper.check_and_keep(id, root, &question(&instruction, &input));
            }
        }
        let passed: Vec<(i64, i64, String, String, String)> = {
            let mut statement = tx.prepare(
                "SELECT id, root_id, instruction, input, coalesce(response, '') FROM items
                 WHERE round = ?1 AND status = ?2 ORDER BY id",
            )?;
            let rows = statement.query_map(params![round, Status::Passed], |row| {
                Ok((row.get(0)?, row.get(1)?, row.get(2)?, row.get(3)?, row.get(4)?))
            })?;
            rows.collect::<rusqlite::Result<_>>()?
        };
        let now = now_ms();
        for (id, root, instruction, input, response) in passed {
            let question = question(&instruction, &input);
            let removal =
                decontaminator.check(&question, &response).or_else(|| deduper.check_and_keep(id, root, &question));
            let status = if removal.is_some() { Status::Removed } else { Status::Accepted };
            tx.execute(
                "UPDATE items SET status = ?2, reason = ?3, detail = ?4, updated_at = ?5 WHERE id = ?1",
                params![
                    id,
                    status,
                    removal.as_ref().map(|r| r.reason),
                    removal.as_ref().map(|r| r.detail.as_str()),
                    now
                ],
            )?;
        }
        tx.execute("UPDATE rounds SET finished_at = ?2 WHERE round = ?1", params![round, now])?;
        tx.commit()?;
        Ok(())
    }

    /// The rounds present, in order.
    pub fn rounds(&self) -> Result<Vec<u32>> {
        let mut statement = self.conn.prepare("SELECT round FROM rounds ORDER BY round")?;
        let rows = statement.query_map([], |row| row.get(0))?;
        Ok(rows.collect::<rusqlite::Result<_>>()?)
    }

    /// Counts, reasons and lengths of one round.
    pub fn round_stats(&self, round: u32) -> Result<RoundStats> {
        let mut stats = RoundStats { round, finished: self.finished(round)?, ..RoundStats::default() };
        let mut statement = self.conn.prepare(
            "SELECT status, reason, verdict, instruction, response, prompt_tokens, completion_tokens FROM items WHERE round = ?1",
        )?;
        let mut rows = statement.query([round])?;
        let (mut instruction_words, mut response_words) = (0usize, 0usize);
        while let Some(row) = rows.next()? {
            let status: Status = row.get(0)?;
            stats.items += 1;
            match status {
                Status::Pending => stats.pending += 1,
                Status::Passed => stats.passed += 1,
                Status::Accepted => stats.accepted += 1,
                Status::Rejected => stats.rejected += 1,
                Status::Removed => stats.removed += 1,
            }
            if let Some(reason) = row.get::<_, Option<String>>(1)? {
                *stats.reasons.entry(reason).or_default() += 1;
            }
            if row.get::<_, Option<String>>(2)?.as_deref() == Some("unclear") {
                stats.unclear_verdicts += 1;
            }
            if status == Status::Accepted {
                instruction_words += row.get::<_, Option<String>>(3)?.unwrap_or_default().split_whitespace().count();
                response_words += row.get::<_, Option<String>>(4)?.unwrap_or_default().split_whitespace().count();
            }
            stats.prompt_tokens += row.get::<_, i64>(5)? as u64;
            stats.completion_tokens += row.get::<_, i64>(6)? as u64;
        }
        if stats.accepted > 0 {
            stats.instruction_words = instruction_words as f64 / stats.accepted as f64;
            stats.response_words = response_words as f64 / stats.accepted as f64;
        }
        stats.mean_latency_ms = self.conn.query_row(
            "SELECT coalesce(avg(a.latency_ms), 0.0) FROM answers AS a JOIN items AS i ON i.id = a.item_id WHERE i.round = ?1",
            [round],
            |row| row.get(0),
        )?;
        Ok(stats)
    }

    fn item_from_row(row: &rusqlite::Row) -> rusqlite::Result<Item> {
        Ok(Item {
            id: row.get(0)?,
            parent_id: row.get(1)?,
            root_id: row.get(2)?,
            round: row.get(3)?,
            method: row.get(4)?,
            instruction: row.get(5)?,
            input: row.get(6)?,
            verdict: row.get(7)?,
            response: row.get(8)?,
            status: row.get(9)?,
            reason: row.get(10)?,
            detail: row.get(11)?,
        })
    }

    const ITEM_COLUMNS: &str =
        "id, parent_id, root_id, round, method, instruction, input, verdict, response, status, reason, detail";

    /// Every item, by id.
    pub fn items(&self) -> Result<Vec<Item>> {
        let mut statement = self.conn.prepare(&format!("SELECT {} FROM items ORDER BY id", Store::ITEM_COLUMNS))?;
        let rows = statement.query_map([], Store::item_from_row)?;
        Ok(rows.collect::<rusqlite::Result<_>>()?)
    }

    /// An item and its ancestors, the seed first.
    pub fn lineage(&self, id: i64) -> Result<Vec<Item>> {
        let mut chain = Vec::new();
        let mut next = Some(id);
        let mut statement = self.conn.prepare(&format!("SELECT {} FROM items WHERE id = ?1", Store::ITEM_COLUMNS))?;
        while let Some(id) = next {
            let item = statement.query_row([id], Store::item_from_row).optional()?;
            let Some(item) = item else {
                return Err(EvolveError::Invalid(format!("no item {id} in {}", self.path)));
            };
            next = item.parent_id;
            chain.push(item);
        }
        chain.reverse();
        Ok(chain)
    }

    /// Accepted items with a response from round 0 and the given rounds, by round then id.
    pub fn exportable(&self, rounds: &[u32]) -> Result<Vec<Item>> {
        let mut statement = self.conn.prepare(&format!(
            "SELECT {} FROM items WHERE status = ?1 AND response IS NOT NULL ORDER BY round, id",
            Store::ITEM_COLUMNS
        ))?;
        let rows = statement.query_map([Status::Accepted], Store::item_from_row)?;
        let mut items = Vec::new();
        for item in rows {
            let item = item?;
            if item.round == 0 || rounds.contains(&item.round) {
                items.push(item);
            }
        }
        Ok(items)
    }

    /// Answers stored for an item, as (stage, answer).
    pub fn answers(&self, item: i64) -> Result<Vec<(String, String)>> {
        let mut statement = self.conn.prepare("SELECT stage, answer FROM answers WHERE item_id = ?1 ORDER BY rowid")?;
        let rows = statement.query_map([item], |row| Ok((row.get(0)?, row.get(1)?)))?;
        Ok(rows.collect::<rusqlite::Result<_>>()?)
    }

    /// Count of stored answers.
    pub fn answer_count(&self) -> Result<u64> {
        Ok(self.conn.query_row("SELECT count(*) FROM answers", [], |row| row.get::<_, i64>(0))? as u64)
    }
}

/// Who answered, and how long it took.
#[derive(Debug, Clone)]
pub struct Answer<'a> {
    /// Backend kind.
    pub backend: &'a str,
    /// Model name.
    pub model: &'a str,
    /// Wall time of the request, retries included.
    pub latency: Duration,
    /// The request's sampling seed.
    pub seed: u64,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn newer_schema_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("db.sqlite");
        drop(Store::open(&path).unwrap());
        Connection::open(&path).unwrap().pragma_update(None, "user_version", 7).unwrap();
        let error = Store::open(&path).err().unwrap().to_string();
        assert!(error.contains("has schema version 7, newer than version 1"), "{error}");
        let other = dir.path().join("other.sqlite");
        Connection::open(&other).unwrap().execute_batch("CREATE TABLE x (y)").unwrap();
        let error = Store::open(&other).err().unwrap().to_string();
        assert!(error.ends_with("is a SQLite database, but not one of wizard evolve"), "{error}");
    }

    /// Each answer fills its column of the item, and the item adds up the usage of all its answers.
    #[test]
    fn answers_fill_their_column_and_add_up_usage() {
        let dir = tempfile::tempdir().unwrap();
        let mut store = Store::open(&dir.path().join("db")).unwrap();
        let seed = Seed { instruction: "Sort a list.".into(), input: String::new(), output: None };
        store.import_seeds(&[seed]).unwrap();
        let id = store.pending(0).unwrap()[0].id;
        let answer = Answer { backend: "fake", model: "m", latency: Duration::from_millis(30), seed: 1 };
        let reply = |text: &str, tokens: u64| Reply {
            text: text.into(),
            finish: "stop".into(),
            prompt_tokens: tokens,
            completion_tokens: 2 * tokens,
            attempts: 1,
        };
        store.save_answer(id, Stage::Judge, "p", &reply("Equal.", 3), "equal", answer.clone()).unwrap();
        store.save_answer(id, Stage::Respond, "p", &reply("sorted(x)", 5), "sorted(x)", answer).unwrap();
        let work = &store.pending(0).unwrap()[0];
        assert_eq!(work.verdict.as_deref(), Some("equal"));
        assert_eq!(work.response, Some(("sorted(x)".to_string(), "stop".to_string())));
        let stats = store.round_stats(0).unwrap();
        assert_eq!((stats.prompt_tokens, stats.completion_tokens, stats.pending), (8, 16, 1), "{stats:?}");
        assert_eq!(store.answer_count().unwrap(), 2);
        // Statuses are stored by name; a name this build does not know is an error, not a guess.
        store.conn.execute("UPDATE items SET status = 'lost'", []).unwrap();
        let error = store.round_stats(0).unwrap_err().to_string();
        assert!(error.contains("unknown item status \"lost\""), "{error}");
    }

    #[test]
    fn seed_must_match() {
        let dir = tempfile::tempdir().unwrap();
        let mut store = Store::open(&dir.path().join("db")).unwrap();
        assert_eq!(store.begin_run(1, "{}").unwrap(), None);
        assert_eq!(store.begin_run(1, "{\"a\": 1}").unwrap().as_deref(), Some("{}"));
        let error = store.begin_run(2, "{}").unwrap_err().to_string();
        assert!(error.contains("--seed = 1, this command asks for 2"), "{error}");
    }
}
