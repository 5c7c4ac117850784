//! What drafting with a pair of models showed, kept across processes in a file of the cache folder:
//! a one-shot `wizard generate` would otherwise learn a pair anew each time, drafting on the prior
//! belief first and probing from its eighth round (the quickstart's pair, which never pays, ran its
//! first generation at 0.8-0.95x the target alone that way). Keyed by both models' weights
//! ([`GptBigCode::content_key`](crate::gpt_bigcode::GptBigCode::content_key)): acceptance belongs to
//! the checkpoints, not to their shapes.
use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// What a pair showed.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Saved {
    /// The per-token acceptance estimate...
    pub acceptance: f64,
    /// ...and how many draft tokens it weighs.
    pub weight: f64,
    /// How far the draft's leads strayed from the target's: the sum of squares...
    pub lead_squares: f64,
    /// ...over this many samples.
    pub lead_samples: f64,
    /// Plain rounds since the last probe...
    pub plain_rounds: usize,
    /// ...and how many the next probe waits for.
    pub probe_wait: usize,
}

/// The file `speculation-pairs.tsv`: lines `pair \t acceptance \t weight \t lead squares \t lead
/// samples \t plain rounds \t probe wait`, the last whole line of a pair counting.
#[derive(Debug, Clone)]
pub struct HistoryFile {
    path: PathBuf,
}

/// A pair's history is written at most this often by one process (a server finishing many
/// generations would otherwise add a line for each).
const WRITE_EVERY: Duration = Duration::from_secs(60);

/// Lines past which reading rewrites the file with one line for each of the [`KEPT_PAIRS`] pairs
/// written last.
const COMPACT_ABOVE: usize = 512;
const KEPT_PAIRS: usize = 256;

static LAST_WRITES: Mutex<Option<HashMap<String, Instant>>> = Mutex::new(None);

impl HistoryFile {
    /// The file in `dir`.
    pub fn in_dir(dir: &Path) -> HistoryFile {
        HistoryFile { path: dir.join("speculation-pairs.tsv") }
    }

    /// The pair's last history, if the file holds a whole, sound line of it.
    pub fn read(&self, pair: &str) -> Option<Saved> {
        let lines = kernels::calibrate::whole_lines(&self.path)?;
        if lines.len() > COMPACT_ABOVE {
            if let Err(error) = self.compact() {
                tracing::warn!(path = %self.path.display(), %error, "draft pair histories not compacted");
            }
        }
        lines.iter().rev().find_map(|line| parse(line, pair))
    }

    /// Keeps `saved` for the pair, unless this process wrote the pair's history less than
    /// [`WRITE_EVERY`] ago. A failure to write costs only the memory of it, so it is logged.
    pub fn write(&self, pair: &str, saved: &Saved) {
        let key = format!("{}\t{pair}", self.path.display());
        {
            let mut writes = LAST_WRITES.lock().unwrap_or_else(|e| e.into_inner());
            let writes = writes.get_or_insert_default();
            if writes.get(&key).is_some_and(|last| last.elapsed() < WRITE_EVERY) {
                return;
            }
            writes.insert(key, Instant::now());
        }
        let line = format!(
            "{pair}\t{}\t{}\t{}\t{}\t{}\t{}\n",
            saved.acceptance,
            saved.weight,
            saved.lead_squares,
            saved.lead_samples,
            saved.plain_rounds,
            saved.probe_wait
        );
        if let Err(error) = self.append(&line) {
            tracing::warn!(path = %self.path.display(), %error, "what the draft pair showed is not kept");
        }
    }

    /// Appends `line` holding a shared lock of the file that is at the path, so that no line goes
    /// to a file a compaction (which holds it exclusively) has just replaced.
    fn append(&self, line: &str) -> std::io::Result<()> {
        if let Some(dir) = self.path.parent() {
            std::fs::create_dir_all(dir)?;
        }
        loop {
            let file = OpenOptions::new().create(true).append(true).open(&self.path)?;
            file.lock_shared()?;
            if self.is_at_path(&file) {
                return (&file).write_all(line.as_bytes());
            }
        }
    }

    /// Whether `file` is still the one at the path (not replaced or removed since it was opened).
    fn is_at_path(&self, file: &File) -> bool {
        match (file.metadata(), std::fs::metadata(&self.path)) {
            (Ok(open), Ok(named)) => (open.dev(), open.ino()) == (named.dev(), named.ino()),
            _ => false,
        }
    }

    /// Rewrites the file, atomically, with the last sound line of each pair written lately; the
    /// lines are read again under an exclusive lock, so that none appended meanwhile is lost.
    fn compact(&self) -> std::io::Result<()> {
        let file = File::open(&self.path)?;
        file.lock()?;
        if !self.is_at_path(&file) {
            return Ok(()); // another process compacted it meanwhile
        }
        let Some(lines) = kernels::calibrate::whole_lines(&self.path) else { return Ok(()) };
        let mut last: HashMap<&str, usize> = HashMap::new();
        for (at, line) in lines.iter().enumerate() {
            if let Some((pair, _)) = line.split_once('\t') {
                if parse(line, pair).is_some() {
                    last.insert(pair, at);
                }
            }
        }
        let mut kept: Vec<usize> = last.into_values().collect();
        kept.sort_unstable();
        let text: String = kept.iter().rev().take(KEPT_PAIRS).rev().map(|&at| format!("{}\n", lines[at])).collect();
        crate::files::write_atomically(&self.path, text.as_bytes())
    }
}

/// A finite number of at least 0.
pub(crate) fn non_negative(text: &str) -> Option<f64> {
    text.parse::<f64>().ok().filter(|v| v.is_finite() && *v >= 0.0)
}

/// The largest mean square of the leads' strays a history may hold (a spread of 100 logits): a
/// larger one would make every drafted token a coin toss for good.
pub(crate) const MEAN_SQUARE_STRAY_MAX: f64 = 1e4;

/// A line's history if it is `pair`'s and every field is in range.
fn parse(line: &str, pair: &str) -> Option<Saved> {
    let [line_pair, acceptance, weight, squares, samples, plain_rounds, wait] =
        line.split('\t').collect::<Vec<_>>()[..]
    else {
        return None;
    };
    if line_pair != pair {
        return None;
    }
    let saved = Saved {
        acceptance: non_negative(acceptance).filter(|&a| a <= 1.0)?,
        weight: non_negative(weight).filter(|&w| w >= 1.0)?,
        lead_squares: non_negative(squares)?,
        lead_samples: non_negative(samples)?,
        plain_rounds: plain_rounds.parse().ok()?,
        probe_wait: wait.parse().ok()?,
    };
    let plausible_noise = saved.lead_squares <= MEAN_SQUARE_STRAY_MAX * saved.lead_samples;
    (saved.plain_rounds <= saved.probe_wait && plausible_noise).then_some(saved)
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: Saved = Saved {
        acceptance: 0.25,
        weight: 24.0,
        lead_squares: 0.5,
        lead_samples: 40.0,
        plain_rounds: 100,
        probe_wait: 1024,
    };

    /// A history is read back by the pair that wrote it, the last whole line counting; other pairs,
    /// lines cut short and fields out of range are not taken.
    #[test]
    fn a_pair_reads_back_its_last_sound_line() {
        let dir = tempfile::tempdir().unwrap();
        let file = HistoryFile::in_dir(&dir.path().join("nested"));
        assert_eq!(file.read("a"), None);
        file.write("a", &GOOD);
        assert_eq!(file.read("a"), Some(GOOD));
        assert_eq!(file.read("b"), None);
        file.write("a", &Saved { acceptance: 0.9, ..GOOD });
        assert_eq!(file.read("a"), Some(GOOD), "written a minute after at the earliest");

        let good = "a\t0.25\t24\t0.5\t40\t100\t1024";
        let check = |text: String, expected: Option<Saved>| {
            std::fs::write(&file.path, &text).unwrap();
            assert_eq!(file.read("a"), expected, "{text:?}");
        };
        check(format!("{good}\n"), Some(GOOD));
        check(format!("\u{ff}\u{fe}garbage\n{good}\n"), Some(GOOD));
        std::fs::write(&file.path, [b"\xff\xfe\n".as_slice(), good.as_bytes(), b"\n"].concat()).unwrap();
        assert_eq!(file.read("a"), Some(GOOD), "bytes that are not UTF-8 spoil only their line");
        check(format!("{good}\na\t0.9\t24\t0.5\t40\t100\t1024\n"), Some(Saved { acceptance: 0.9, ..GOOD }));
        for bad in [
            "a\t0.9\t24\t0.5\t40\t100\t1024",      // cut short: no newline
            "a\t1.5\t24\t0.5\t40\t100\t1024\n",    // acceptance above 1
            "a\tNaN\t24\t0.5\t40\t100\t1024\n",    // not a number
            "a\t0.9\t-1\t0.5\t40\t100\t1024\n",    // negative weight
            "a\t0.9\t0\t0.5\t40\t100\t1024\n",     // a weight of nothing
            "a\t0.9\t24\t0.5\t40\t2000\t1024\n",   // more plain rounds than the wait
            "a\t0.9\t24\t1e300\t0\t100\t1024\n",   // strays without samples
            "a\t0.9\t24\t1e9\t40\t100\t1024\n",    // strays of hundreds of logits
            "a\t0.9\t24\t0.5\t40\t100\n",          // a field short
            "a\t0.9\t24\t0.5\t40\t100\t1024\tx\n", // a field too many
            "b\t0.9\t24\t0.5\t40\t100\t1024\n",    // another pair
        ] {
            check(format!("{good}\n{bad}"), Some(GOOD));
        }
    }

    /// A file grown past [`COMPACT_ABOVE`] lines is rewritten with each pair's last sound line.
    #[test]
    fn a_long_file_is_compacted() {
        let dir = tempfile::tempdir().unwrap();
        let file = HistoryFile::in_dir(dir.path());
        let mut text = String::from("not a line\n");
        for i in 0..COMPACT_ABOVE {
            let pair = if i % 2 == 0 { "a" } else { "b" };
            text += &format!("{pair}\t0.{i}\t24\t0.5\t40\t{}\t1024\n", i % 1000);
        }
        std::fs::write(&file.path, text).unwrap();
        let (last_a, last_b) = (file.read("a").unwrap(), file.read("b").unwrap());
        let compacted = std::fs::read_to_string(&file.path).unwrap();
        assert_eq!(compacted.lines().count(), 2, "{compacted}");
        assert_eq!((file.read("a"), file.read("b")), (Some(last_a), Some(last_b)));
        // Of many pairs, those written last are kept.
        let text: String = (0..COMPACT_ABOVE + 1).map(|i| format!("pair {i}\t0.5\t24\t0.5\t40\t1\t8\n")).collect();
        std::fs::write(&file.path, text).unwrap();
        assert!(file.read("pair 0").is_some(), "read before the rewrite");
        let compacted = std::fs::read_to_string(&file.path).unwrap();
        assert_eq!(compacted.lines().count(), KEPT_PAIRS);
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1, "no file left beside it");
        assert!(file.read("pair 0").is_none() && file.read(&format!("pair {COMPACT_ABOVE}")).is_some());
    }

    /// Lines appended while another process compacts the file are kept (each handle here opens
    /// the file anew, as another process would).
    #[test]
    fn no_line_is_lost_to_a_compaction() {
        let dir = tempfile::tempdir().unwrap();
        let file = HistoryFile::in_dir(dir.path());
        let pairs = 200;
        let written = std::sync::atomic::AtomicBool::new(false);
        let filler = "filler\t0.5\t24\t0.5\t40\t1\t8\n".repeat(COMPACT_ABOVE + 1);
        let mut compactions = 0;
        std::thread::scope(|scope| {
            scope.spawn(|| {
                for i in 0..pairs {
                    file.write(&format!("unique pair {i}"), &GOOD);
                }
                written.store(true, std::sync::atomic::Ordering::Release);
            });
            while compactions < 3 || !written.load(std::sync::atomic::Ordering::Acquire) {
                file.append(&filler).unwrap();
                file.read("filler");
                compactions += 1;
            }
        });
        file.append(&filler).unwrap();
        file.read("filler");
        let lost: Vec<usize> = (0..pairs).filter(|i| file.read(&format!("unique pair {i}")) != Some(GOOD)).collect();
        assert!(lost.is_empty(), "{} of {pairs} lost over {compactions} compactions: {lost:?}", lost.len());
    }
}
