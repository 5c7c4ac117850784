//! `wizard serve --http` through real HTTP clients: OpenAI's completion, chat and streaming shapes,
//! llama.cpp's /infill, batch-invariant greedy output, the API key, the bounded queue, client
//! disconnects, hostile bodies, `wizard evolve --base-url` and the `openai` Python package.
mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::time::Duration;

use model::config::ModelConfig;
use model::gpt_bigcode::{Dropout, GptBigCode};
use model::tokenizer::Tokenizer;
use serde_json::{json, Value};
use tch::{Device, Kind};

/// A random model (context 256) with our tokenizer, which has StarCoder's FIM tokens.
fn model_dir() -> &'static Path {
    static DIR: OnceLock<(tempfile::TempDir, PathBuf)> = OnceLock::new();
    &DIR.get_or_init(|| make_model(64, 2)).1
}

/// The same with bigger layers: a few milliseconds per token, so requests stay in flight a while.
fn slow_model_dir() -> &'static Path {
    static DIR: OnceLock<(tempfile::TempDir, PathBuf)> = OnceLock::new();
    &DIR.get_or_init(|| make_model(512, 8)).1
}

/// The same shape as [`model_dir`], whose every next token is the end of text: its final
/// LayerNorm gives every position the end-of-text embedding (the head is tied to it).
fn ending_model_dir() -> &'static Path {
    static DIR: OnceLock<(tempfile::TempDir, PathBuf)> = OnceLock::new();
    &DIR.get_or_init(|| {
        let (work, dir) = make_model(64, 2);
        let model = GptBigCode::load(&dir, Kind::Float, Device::Cpu).unwrap();
        let vars = model.vars().variables();
        tch::no_grad(|| {
            let end_of_text = vars["transformer.wte.weight"].get(0) * 10.0;
            let _ = vars["transformer.ln_f.weight"].shallow_clone().zero_();
            vars["transformer.ln_f.bias"].shallow_clone().copy_(&end_of_text);
        });
        model.save(&dir, Kind::Float).unwrap();
        (work, dir)
    })
    .1
}

fn make_model(n_embd: i64, n_layer: i64) -> (tempfile::TempDir, PathBuf) {
    {
        let work = tempfile::tempdir().unwrap();
        let dir = work.path().join("model");
        std::fs::create_dir_all(&dir).unwrap();
        let corpus = dir.join("corpus.py");
        let code: String =
            (0..100).map(|i| format!("def function_{i}(value):\n    return value * {i} + é\n\n")).collect();
        std::fs::write(&corpus, code).unwrap();
        common::train_tokenizer(&corpus, 400, &dir);
        let tokenizer = Tokenizer::from_dir(&dir).unwrap();
        tch::manual_seed(3);
        let config = ModelConfig {
            vocab_size: tokenizer.vocab_size() as i64,
            n_positions: 256,
            n_embd,
            n_layer,
            n_head: 4,
            initializer_range: 0.2,
            bos_token_id: Some(0),
            eos_token_id: Some(0),
            ..ModelConfig::default()
        };
        GptBigCode::new(config, Device::Cpu).unwrap().save(&dir, Kind::Float).unwrap();
        (work, dir)
    }
}

struct Server {
    child: Child,
    address: String,
}

impl Drop for Server {
    fn drop(&mut self) {
        if self.child.try_wait().ok().flatten().is_none() {
            common::kill_group(&mut self.child);
        }
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// `wizard serve --http` on a free port with `extra` flags, once `/health` answers.
fn start(extra: &[&str]) -> Server {
    start_with(model_dir(), extra)
}

fn start_with(model: &Path, extra: &[&str]) -> Server {
    let port = free_port();
    let mut command = common::wizard_command(&["serve", "--http", &port.to_string(), "--model"]);
    command.arg(model).args(extra).env("WIZARD_TEST_KEY", "sekret").stdout(Stdio::null()).stderr(Stdio::null());
    #[cfg(unix)]
    std::os::unix::process::CommandExt::process_group(&mut command, 0);
    let server = Server { child: command.spawn().unwrap(), address: format!("127.0.0.1:{port}") };
    common::wait_until("the server answers /health", Duration::from_secs(60), || {
        raw(&server.address, "GET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").0 == 200
    });
    server
}

/// Sends `request` bytes as they are; the status and body (an unreachable server is status 0).
fn raw(address: &str, request: &str) -> (u16, String) {
    raw_bytes(address, request.as_bytes())
}

fn raw_bytes(address: &str, request: &[u8]) -> (u16, String) {
    let answer = exchange(address, request);
    let status = answer.split(' ').nth(1).and_then(|s| s.parse().ok()).unwrap_or(0);
    let body = answer.split_once("\r\n\r\n").map_or(String::new(), |(_, body)| body.to_string());
    (status, body)
}

/// Sends `request` bytes as they are; the whole answer, head and body (empty where the server is
/// unreachable).
fn exchange(address: &str, request: &[u8]) -> String {
    let Ok(mut stream) = TcpStream::connect(address) else { return String::new() };
    stream.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
    let _ = stream.write_all(request);
    let mut answer = Vec::new();
    let _ = stream.read_to_end(&mut answer);
    String::from_utf8_lossy(&answer).into_owned()
}

fn post_request(path: &str, body: &[u8], key: Option<&str>) -> Vec<u8> {
    let auth = key.map_or(String::new(), |k| format!("Authorization: Bearer {k}\r\n"));
    let mut request = format!(
        "POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n{auth}Content-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    )
    .into_bytes();
    request.extend_from_slice(body);
    request
}

/// POSTs JSON; the status and the body (chunked transfer is undone for JSON answers by reading the
/// whole stream: the server sends JSON with a Content-Length).
fn post(server: &Server, path: &str, body: &Value) -> (u16, Value) {
    let (status, text) = raw_bytes(&server.address, &post_request(path, body.to_string().as_bytes(), None));
    (status, serde_json::from_str(&text).unwrap_or_else(|e| panic!("{e}: {text:?}")))
}

/// POSTs a streaming request; the status and the `data:` payloads in order.
fn post_stream(server: &Server, path: &str, body: &Value) -> (u16, Vec<String>) {
    let (status, text) = raw_bytes(&server.address, &post_request(path, body.to_string().as_bytes(), None));
    let data = text.lines().filter_map(|l| l.strip_prefix("data: ")).map(str::to_string).collect();
    (status, data)
}

fn completion_text(body: &Value) -> String {
    body["choices"][0]["text"].as_str().unwrap_or_else(|| panic!("no text in {body}")).to_string()
}

#[test]
fn openai_shapes_streaming_and_batch_invariance() {
    let server = start(&[]);
    let prompt = "def function_7(value):\n";
    let greedy = json!({"prompt": prompt, "max_tokens": 24, "temperature": 0, "logprobs": 2, "unknown_field": [1]});
    let (status, whole) = post(&server, "/v1/completions", &greedy);
    assert_eq!(status, 200, "{whole}");
    assert_eq!(whole["object"], "text_completion");
    assert_eq!(whole["choices"][0]["finish_reason"], "length");
    assert_eq!(whole["usage"]["completion_tokens"], 24);
    let logprobs = &whole["choices"][0]["logprobs"];
    assert_eq!(logprobs["token_logprobs"].as_array().unwrap().len(), 24);
    assert!(logprobs["token_logprobs"].as_array().unwrap().iter().all(|l| l.as_f64().unwrap() <= 0.0));
    assert_eq!(logprobs["tokens"].as_array().unwrap().len(), 24);
    let text = completion_text(&whole);

    // Streamed: the same text in pieces, a finish reason, the usage, then [DONE].
    let streamed = json!({"prompt": prompt, "max_tokens": 24, "temperature": 0, "stream": true,
                          "stream_options": {"include_usage": true}});
    let (status, chunks) = post_stream(&server, "/v1/completions", &streamed);
    assert_eq!(status, 200);
    assert_eq!(chunks.last().map(String::as_str), Some("[DONE]"));
    let values: Vec<Value> = chunks[..chunks.len() - 1].iter().map(|c| serde_json::from_str(c).unwrap()).collect();
    let pieces: String = values.iter().filter_map(|v| v["choices"][0]["text"].as_str()).collect();
    assert_eq!(pieces, text);
    assert!(values.iter().any(|v| v["choices"][0]["finish_reason"] == "length"));
    assert_eq!(values.last().unwrap()["usage"]["completion_tokens"], 24);

    // A stop sequence taken from the greedy text cuts it there, streamed or not.
    let stop: String = text.chars().skip(3).take(2).collect();
    let cut = &text[..text.find(&stop).unwrap()];
    let with_stop = json!({"prompt": prompt, "max_tokens": 24, "temperature": 0, "stop": [stop]});
    let (_, body) = post(&server, "/v1/completions", &with_stop);
    assert_eq!((completion_text(&body).as_str(), body["choices"][0]["finish_reason"].as_str()), (cut, Some("stop")));
    let mut streamed_stop = with_stop.clone();
    streamed_stop["stream"] = json!(true);
    let (_, chunks) = post_stream(&server, "/v1/completions", &streamed_stop);
    let pieces: String = chunks
        .iter()
        .filter_map(|c| serde_json::from_str::<Value>(c).ok())
        .filter_map(|v| v["choices"][0]["text"].as_str().map(str::to_string))
        .collect();
    assert_eq!(pieces, cut);
    // Stops as long as a body allows cost their length once, not at every step of every sample
    // (4 x 1 MB over 4 samples took seconds a step), streamed or not.
    let long_stops =
        json!({"prompt": prompt, "max_tokens": 24, "temperature": 0, "n": 4, "stop": vec!["q".repeat(1 << 20); 4]});
    let (status, body) = post(&server, "/v1/completions", &long_stops);
    assert_eq!((status, completion_text(&body)), (200, text.clone()), "{body}");
    let mut streamed_long = long_stops.clone();
    streamed_long["stream"] = json!(true);
    let (status, chunks) = post_stream(&server, "/v1/completions", &streamed_long);
    assert_eq!((status, chunks.last().map(String::as_str)), (200, Some("[DONE]")));

    // 16 clients at once get what each gets alone (greedy, different prompts).
    let prompts: Vec<String> = (0..16).map(|i| format!("def function_{i}(value):\n    return")).collect();
    let request = |p: &String| json!({"prompt": p, "max_tokens": 16, "temperature": 0});
    let alone: Vec<String> =
        prompts.iter().map(|p| completion_text(&post(&server, "/v1/completions", &request(p)).1)).collect();
    let together: Vec<String> = std::thread::scope(|scope| {
        let handles: Vec<_> = prompts
            .iter()
            .map(|p| scope.spawn(|| completion_text(&post(&server, "/v1/completions", &request(p)).1)))
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    assert_eq!(together, alone);
    // One request of more prompts x n than the batch holds is fed through it, each choice its
    // prompt's own, streamed or not.
    let many = json!({"prompt": prompts, "max_tokens": 16, "temperature": 0, "n": 2});
    let expected: Vec<String> = alone.iter().flat_map(|text| [text.clone(), text.clone()]).collect();
    let (status, body) = post(&server, "/v1/completions", &many);
    assert_eq!(status, 200, "{body}");
    let texts: Vec<String> =
        body["choices"].as_array().unwrap().iter().map(|c| c["text"].as_str().unwrap().to_string()).collect();
    assert_eq!(texts, expected);
    let mut streamed_many = many.clone();
    streamed_many["stream"] = json!(true);
    let (status, chunks) = post_stream(&server, "/v1/completions", &streamed_many);
    assert_eq!((status, chunks.last().map(String::as_str)), (200, Some("[DONE]")));
    let mut texts = vec![String::new(); expected.len()];
    for chunk in chunks.iter().filter_map(|c| serde_json::from_str::<Value>(c).ok()) {
        let choice = &chunk["choices"][0];
        texts[choice["index"].as_u64().unwrap() as usize] += choice["text"].as_str().unwrap_or_default();
    }
    assert_eq!(texts, expected);
    let (_, metrics) = raw(&server.address, "GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
    let mean_batch: f64 = metric(&metrics, "wizard_mean_batch_size");
    assert!(mean_batch > 1.0, "{metrics}");
    assert!(metrics.contains("wizard_requests_total{endpoint=\"/v1/completions\",status=\"200\"}"), "{metrics}");
    assert!(metrics.contains("wizard_time_to_first_token_seconds_count"), "{metrics}");

    // n samples with a seed are reproducible; token-id prompts and echo; chat; /infill; /v1/models.
    let sampled = json!({"prompt": prompt, "max_tokens": 12, "temperature": 1.0, "n": 3, "seed": 9});
    let (_, first) = post(&server, "/v1/completions", &sampled);
    let (_, second) = post(&server, "/v1/completions", &sampled);
    assert_eq!(first["choices"], second["choices"]);
    assert_eq!(first["choices"].as_array().unwrap().len(), 3);
    let (status, echoed) =
        post(&server, "/v1/completions", &json!({"prompt": [5, 6, 7], "max_tokens": 3, "echo": true}));
    assert_eq!((status, echoed["usage"]["prompt_tokens"].as_u64()), (200, Some(3)), "{echoed}");
    // Streamed, each prompt's echo comes once, first, and each choice's pieces make its text.
    let echoed = json!({"prompt": [[5, 6, 7], [8, 9]], "max_tokens": 3, "echo": true, "temperature": 0});
    let (_, whole) = post(&server, "/v1/completions", &echoed);
    let mut streamed = echoed.clone();
    streamed["stream"] = json!(true);
    let (_, chunks) = post_stream(&server, "/v1/completions", &streamed);
    let mut pieces = [String::new(), String::new()];
    for chunk in chunks.iter().filter_map(|c| serde_json::from_str::<Value>(c).ok()) {
        let choice = &chunk["choices"][0];
        pieces[choice["index"].as_u64().unwrap() as usize] += choice["text"].as_str().unwrap_or_default();
    }
    for (index, piece) in pieces.iter().enumerate() {
        assert_eq!(Some(piece.as_str()), whole["choices"][index]["text"].as_str(), "{whole} {chunks:?}");
    }
    let (status, chat) = post(
        &server,
        "/v1/chat/completions",
        &json!({"messages": [{"role": "user", "content": "Write a function."}], "max_tokens": 5}),
    );
    assert_eq!((status, chat["object"].as_str()), (200, Some("chat.completion")), "{chat}");
    assert_eq!(chat["choices"][0]["message"]["role"], "assistant");
    let (_, chunks) = post_stream(
        &server,
        "/v1/chat/completions",
        &json!({"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 5, "stream": true}),
    );
    assert!(chunks[0].contains("\"role\":\"assistant\"") && chunks.last().unwrap() == "[DONE]", "{chunks:?}");
    let created: Vec<Value> =
        chunks.iter().filter_map(|c| serde_json::from_str::<Value>(c).ok()).map(|c| c["created"].clone()).collect();
    assert!(created.windows(2).all(|pair| pair[0] == pair[1]), "one `created` per stream: {created:?}");
    // Content as text parts, `developer` as system, and earlier assistant turns in the prompt;
    // without max_tokens a reply may take what the context leaves, as OpenAI's chat does.
    let chat = |messages: Value| {
        let (status, body) = post(&server, "/v1/chat/completions", &json!({"messages": messages, "temperature": 0}));
        assert_eq!(status, 200, "{body}");
        body
    };
    let plain =
        chat(json!([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Write a function."}]));
    let parts = chat(json!([{"role": "developer", "content": [{"type": "text", "text": "Be brief."}]},
                            {"role": "user", "content": [{"type": "text", "text": "Write a "}, {"type": "text", "text": "function."}]}]));
    assert_eq!(parts["choices"], plain["choices"]);
    assert_eq!(parts["usage"], plain["usage"]);
    let (used, finish) = (plain["usage"]["completion_tokens"].as_u64().unwrap(), &plain["choices"][0]["finish_reason"]);
    assert!(used > 64 || finish == "stop", "the reply was cut at {used} tokens: {plain}");
    let turns = json!([{"role": "user", "content": "Write a function."}, {"role": "assistant", "content": "def f(): pass"},
                       {"role": "user", "content": "Shorter."}]);
    let later = chat(turns);
    let prompt_tokens = |body: &Value| body["usage"]["prompt_tokens"].as_u64().unwrap();
    assert!(prompt_tokens(&later) > prompt_tokens(&plain) + 2, "the assistant's turn is in the prompt: {later}");
    let (status, one) = raw(&server.address, "GET /v1/models/model HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
    assert!(status == 200 && one.contains("\"id\":\"model\""), "{one}");
    let (status, other) = raw(&server.address, "GET /v1/models/gpt-4 HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
    assert!(status == 404 && other.contains("model_not_found"), "{other}");
    // An empty prompt starts from the end-of-text token.
    let (status, empty) = post(&server, "/v1/completions", &json!({"prompt": "", "max_tokens": 3, "echo": true}));
    assert_eq!((status, empty["usage"]["prompt_tokens"].as_u64()), (200, Some(1)), "{empty}");
    assert!(!completion_text(&empty).contains("<|endoftext|>"), "the echo is the prompt as sent: {empty}");
    // Seeds as OpenAI writes them (signed) and as others do (unsigned, to 2^64 - 1).
    for seed in [json!(-1), json!(u64::MAX)] {
        let (status, body) = post(&server, "/v1/completions", &json!({"prompt": "x", "max_tokens": 2, "seed": seed}));
        assert_eq!(status, 200, "{seed}: {body}");
    }
    let (status, infill) = post(
        &server,
        "/infill",
        &json!({"input_prefix": "def f(x):\n    ", "input_suffix": "\n    return y\n",
        "input_extra": [{"filename": "b.py", "text": "y = 2\n"}], "n_predict": 6}),
    );
    assert_eq!((status, infill["stop"].as_bool()), (200, Some(true)), "{infill}");
    assert!(infill["content"].is_string() && infill["tokens_predicted"].as_u64().unwrap() <= 6, "{infill}");
    let (status, models) = raw(&server.address, "GET /v1/models HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
    assert!(status == 200 && models.contains("\"object\":\"list\""), "{models}");
}

/// A choice's text and legacy logprobs, whole or gathered from its streamed chunks.
#[derive(Debug, Default, PartialEq)]
struct Scored {
    text: String,
    tokens: Vec<String>,
    logprobs: Vec<Option<f64>>,
    tops: Vec<Value>,
    offsets: Vec<usize>,
}

impl Scored {
    fn add(&mut self, choice: &Value) {
        self.text += choice["text"].as_str().unwrap();
        let logprobs = &choice["logprobs"];
        let list = |key: &str| logprobs[key].as_array().cloned().unwrap_or_default();
        self.tokens.extend(list("tokens").iter().map(|t| t.as_str().unwrap().to_string()));
        self.logprobs.extend(list("token_logprobs").iter().map(Value::as_f64));
        self.tops.extend(list("top_logprobs"));
        self.offsets.extend(list("text_offset").iter().map(|o| o.as_u64().unwrap() as usize));
    }
}

fn scored(server: &Server, body: &Value) -> Vec<Scored> {
    let mut choices: Vec<Scored> = Vec::new();
    let mut add = |choice: &Value| {
        let index = choice["index"].as_u64().unwrap() as usize;
        choices.resize_with(choices.len().max(index + 1), Scored::default);
        choices[index].add(choice);
    };
    if body["stream"] == true {
        let (status, chunks) = post_stream(server, "/v1/completions", body);
        assert_eq!(status, 200, "{chunks:?}");
        for chunk in chunks.iter().filter_map(|c| serde_json::from_str::<Value>(c).ok()) {
            chunk["choices"].as_array().unwrap().iter().for_each(&mut add);
        }
    } else {
        let (status, whole) = post(server, "/v1/completions", body);
        assert_eq!(status, 200, "{whole}");
        whole["choices"].as_array().unwrap().iter().for_each(&mut add);
    }
    choices
}

/// The prompt's logprobs (`echo`), as the model's own forward pass gives them; streamed logprobs
/// that add up to the whole answer's; offsets into the text, characters split over several tokens
/// written as OpenAI does (`bytes:\x..`); the chat API's logprobs.
#[test]
fn logprobs_of_prompts_and_streams() {
    let server = start(&[]);
    // Token ids as the prompt: the answer is checked against the model's own forward pass.
    let vocab = Tokenizer::from_dir(model_dir()).unwrap().vocab_size() as i64;
    let ids: Vec<i64> = (0..60).map(|i| (i * 37 + 11) % vocab).collect();
    let echoed =
        &scored(&server, &json!({"prompt": ids, "max_tokens": 8, "temperature": 0, "echo": true, "logprobs": 3}))[0];
    assert_eq!((echoed.tokens.len(), echoed.logprobs[0]), (68, None), "nothing predicts the first token");
    let model = GptBigCode::load(model_dir(), Kind::Float, Device::Cpu).unwrap();
    let logits =
        tch::no_grad(|| model.forward_full(&tch::Tensor::from_slice(&ids).unsqueeze(0), Dropout::Off)).unwrap();
    let expected: Vec<f32> = logits.log_softmax(-1, Kind::Float).get(0).reshape([-1]).try_into().unwrap();
    for position in 1..ids.len() {
        let (scored, top) = (echoed.logprobs[position].unwrap(), echoed.tops[position].as_object().unwrap());
        assert_eq!(
            top.get(&echoed.tokens[position]).and_then(Value::as_f64),
            Some(scored),
            "the chosen token is listed"
        );
        let row = &expected[(position - 1) * vocab as usize..position * vocab as usize];
        let reference = f64::from(row[ids[position] as usize]);
        assert!((scored - reference).abs() < 1e-3, "token {position}: {scored}, the forward pass {reference}");
        let mut best = row.to_vec();
        best.sort_by(|a, b| b.total_cmp(a));
        let mut reported: Vec<f64> = top.values().filter_map(Value::as_f64).collect();
        reported.sort_by(|a, b| b.total_cmp(a));
        assert!(reported.len() <= 4 && (reported[0] - f64::from(best[0])).abs() < 1e-3, "{top:?} {:?}", &best[..3]);
    }
    // Greedy: each written token is its position's most likely one.
    for (index, top) in echoed.tops[60..].iter().enumerate() {
        let best = top.as_object().unwrap().values().filter_map(Value::as_f64).fold(f64::MIN, f64::max);
        assert!((best - echoed.logprobs[60 + index].unwrap()).abs() < 1e-6, "token {index}: {top}");
    }
    let prompt = "def function_7(value):\n    return value";
    let text = &scored(&server, &json!({"prompt": prompt, "max_tokens": 0, "echo": true, "logprobs": 1}))[0];
    assert_eq!(text.text, prompt);
    for (token, &offset) in text.tokens.iter().zip(&text.offsets) {
        assert!(prompt[offset..].starts_with(token.as_str()), "{token:?} at {offset} of {prompt:?}");
    }

    // Characters the tokenizer has no token for come in bytes; each starts where its character does.
    let wide = "x = '日本'\n";
    let bytes = &scored(&server, &json!({"prompt": wide, "max_tokens": 0, "echo": true, "logprobs": 0}))[0];
    let split: Vec<(&str, usize)> = bytes
        .tokens
        .iter()
        .zip(&bytes.offsets)
        .filter(|(token, _)| token.starts_with("bytes:"))
        .map(|(token, &offset)| (token.as_str(), offset))
        .collect();
    let expected = [("bytes:\\xe6", 5), ("bytes:\\x97", 5), ("bytes:\\xa5", 5), ("bytes:\\xe6", 6)];
    assert_eq!(split[..4], expected, "{bytes:?}");

    // Streamed, with echo and a stop sequence, the chunks add up to the whole answer, two prompts
    // and two samples each; no token past the stop sequence is reported.
    let generated = &scored(&server, &json!({"prompt": prompt, "max_tokens": 12, "temperature": 0}))[0];
    let stop: String = generated.text.chars().skip(4).take(2).collect();
    let body = json!({"prompt": [prompt, wide], "max_tokens": 20, "temperature": 0.8, "seed": 5, "n": 2,
                      "echo": true, "logprobs": 1, "stop": [stop]});
    let whole = scored(&server, &body);
    let mut streamed = body.clone();
    streamed["stream"] = json!(true);
    assert_eq!(scored(&server, &streamed), whole);
    assert_eq!(whole.len(), 4);
    for choice in &whole {
        let length = choice.text.chars().count();
        assert!(choice.offsets.iter().all(|&offset| offset < length), "{choice:?}");
        assert_eq!(choice.logprobs.iter().filter(|l| l.is_none()).count(), 1, "{choice:?}");
    }

    // A scoring request of lm-evaluation-harness (echo, max_tokens 1, its last entry taken for the
    // generated token) on a model that ends at once: the end of text is that entry, at the end of
    // the text, never in it.
    let ending = start_with(ending_model_dir(), &[]);
    for stream in [false, true] {
        let body = json!({"prompt": "def f", "max_tokens": 1, "echo": true, "logprobs": 1, "stream": stream});
        let choice = &scored(&ending, &body)[0];
        assert_eq!((choice.text.as_str(), choice.tokens.last().map(String::as_str)), ("def f", Some("<|endoftext|>")));
        assert_eq!(choice.offsets.last(), Some(&5), "{choice:?}");
        assert!(choice.logprobs.last().unwrap().unwrap() > -0.01, "{choice:?}");
    }

    // A prompt that fills the context can be scored (and only scored).
    let full: Vec<i64> = (0..256).map(|i| (i * 7 + 3) % vocab).collect();
    let whole_context = &scored(&server, &json!({"prompt": full, "max_tokens": 0, "echo": true, "logprobs": 0}))[0];
    assert_eq!(whole_context.tokens.len(), 256);
    let (status, error) = post(&server, "/v1/completions", &json!({"prompt": full, "max_tokens": 1}));
    assert_eq!(status, 400, "{error}");

    // A byte that begins no character is one U+FFFD; the next token starts after it.
    let tokenizer = Tokenizer::from_dir(model_dir()).unwrap();
    let [lone, m, a] = ["\u{fd}", "m", "a"].map(|t| tokenizer.token_id(t).unwrap());
    let body = json!({"prompt": [lone, m, a], "max_tokens": 0, "echo": true, "logprobs": 0, "stream": null});
    let invalid = &scored(&server, &body)[0];
    assert_eq!((invalid.text.as_str(), invalid.offsets.as_slice()), ("\u{fffd}ma", [0, 1, 2].as_slice()));
    assert_eq!(invalid.tokens[0], "bytes:\\xfd");

    // Chat: `logprobs: true` with `top_logprobs`, whole and streamed alike.
    let chat = json!({"messages": [{"role": "user", "content": "Write a function."}], "max_tokens": 10,
                      "temperature": 0, "logprobs": true, "top_logprobs": 2});
    let (status, whole) = post(&server, "/v1/chat/completions", &chat);
    assert_eq!(status, 200, "{whole}");
    let content = whole["choices"][0]["logprobs"]["content"].as_array().unwrap().clone();
    assert_eq!(content.len() as u64, whole["usage"]["completion_tokens"].as_u64().unwrap(), "{whole}");
    for entry in &content {
        let best = entry["top_logprobs"][0]["logprob"].as_f64().unwrap();
        assert!((entry["logprob"].as_f64().unwrap() - best).abs() < 1e-6, "greedy: {entry}");
        assert!(entry["bytes"].as_array().is_some_and(|b| !b.is_empty()), "{entry}");
    }
    let mut streamed = chat.clone();
    streamed["stream"] = json!(true);
    let (_, chunks) = post_stream(&server, "/v1/chat/completions", &streamed);
    let pieces: Vec<Value> = chunks
        .iter()
        .filter_map(|c| serde_json::from_str::<Value>(c).ok())
        .filter_map(|c| c["choices"][0]["logprobs"]["content"].as_array().cloned())
        .flatten()
        .collect();
    assert_eq!(pieces, content);
    for (bad, message) in [
        (json!({"top_logprobs": 2}), "needs logprobs"),
        (json!({"logprobs": true, "top_logprobs": 21}), "0..=20"),
        (json!({"tool_choice": "required"}), "tool_choice: calling tools is not supported"),
        (json!({"response_format": {"type": "json_object"}}), "response_format: a response format other than text"),
        (json!({"response_format": "json_object"}), "response_format: a response format other than text"),
        (
            json!({"messages": [{"role": "user", "content": 5}]}),
            "content must be a string, an array of text parts or null",
        ),
        (json!({"messages": [{"role": "tool", "content": "4"}]}), "messages[0]: this server does not call tools"),
        (json!({"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}), "only text parts"),
        (json!({"messages": [{"role": "assistant", "content": "x"}]}), "no user or system text"),
    ] {
        let mut body = json!({"messages": [{"role": "user", "content": "x"}]});
        body.as_object_mut().unwrap().extend(bad.as_object().unwrap().clone());
        let (status, error) = post(&server, "/v1/chat/completions", &body);
        assert!(status == 400 && error["error"]["message"].as_str().unwrap().contains(message), "{error}");
    }
}

fn metric(text: &str, name: &str) -> f64 {
    text.lines()
        .find_map(|l| l.strip_prefix(name).and_then(|rest| rest.trim().parse().ok()))
        .unwrap_or_else(|| panic!("{name} missing in\n{text}"))
}

/// Every bad body answers a 4xx with OpenAI's error object naming the field, and the server goes on.
#[test]
fn bad_requests_get_openai_errors() {
    let server = start(&["--max-body-bytes", "1000000"]);
    let check = |body: &[u8], status: u16, expected: &str| {
        let (got, text) = raw_bytes(&server.address, &post_request("/v1/completions", body, None));
        assert_eq!(got, status, "{}: {text}", String::from_utf8_lossy(body));
        let error: Value = serde_json::from_str(&text).unwrap_or_else(|e| panic!("{e}: {text}"));
        let message = error["error"]["message"].as_str().unwrap_or_default();
        assert!(message.contains(expected), "{}: {message}", String::from_utf8_lossy(body));
    };
    let long_prompt = "value ".repeat(400);
    check(b"{\"prompt\": ", 400, "invalid JSON");
    check(b"{\"prompt\": \"x\", \"max_tokens\": \"many\"}", 400, "`max_tokens`: invalid type");
    check(b"{\"prompt\": 3}", 400, "prompt must be");
    check(b"{\"prompt\": \"x\", \"n\": 0}", 400, "n must be between 1 and 16");
    check(b"{\"prompt\": []}", 400, "empty");
    check(b"{\"max_tokens\": 3}", 400, "`prompt`: missing field `prompt`");
    check(
        b"{\"prompt\": \"x\", \"presence_penalty\": 0.5}",
        400,
        "presence_penalty: a penalty other than 0 is not supported",
    );
    check(b"{\"prompt\": \"x\", \"logit_bias\": {\"11\": -100}}", 400, "logit_bias: biasing tokens is not supported");
    check(b"{\"prompt\": \"x\", \"n\": 3, \"best_of\": 1}", 400, "best_of must be at least n (3)");
    check(b"{\"prompt\": [1, 99999]}", 400, "outside the vocabulary");
    check(
        b"{\"prompt\": \"def function_1(value): return\", \"max_tokens\": 250}",
        400,
        "maximum context length is 256",
    );
    check(b"{\"prompt\": \"x\", \"max_tokens\": 300}", 400, "at most 256");
    check(format!("{{\"prompt\": \"{long_prompt}\", \"max_tokens\": 1}}").as_bytes(), 400, "maximum context length");
    check(b"{\"prompt\": \"x\", \"temperature\": -1}", 400, "temperature");
    check(b"{\"prompt\": \"x\", \"top_p\": 1.5}", 400, "top-p");
    let many_stops = json!({"prompt": "x", "stop": (0..17).map(|i| format!("s{i}")).collect::<Vec<_>>()});
    check(many_stops.to_string().as_bytes(), 400, "at most 16 stop sequences, got 17");
    check(b"{\"prompt\": \"x\", \"logprobs\": 9}", 400, "logprobs");
    check(b"{\"prompt\": \"x\", \"logprobs\": 1, \"echo\": true, \"suffix\": \"y\"}", 400, "fill-in-the-middle");
    check(b"{\"prompt\": \"\xff\xfe\"}", 400, "invalid JSON");
    // A body over the limit is refused from its Content-Length, before it is read.
    let (status, text) =
        raw(&server.address, "POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 104857600\r\n\r\n{");
    assert_eq!(status, 413, "{text}");
    assert!(text.contains("larger than 1000000 bytes"), "{text}");
    let (status, text) = raw(&server.address, "GET /nowhere HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
    assert_eq!(status, 404, "{text}");
    let (status, text) = raw(&server.address, "GET /v1/completions HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
    assert_eq!(status, 405, "{text}");
    assert!(text.contains("GET is not allowed"), "{text}");
    // Still serving.
    assert_eq!(post(&server, "/v1/completions", &json!({"prompt": "x", "max_tokens": 2})).0, 200);
}

/// SIGTERM stops a server as an orchestrator expects: no new connections, the streams under way run
/// to their end (`[DONE]`), then exit 0; a request that names no max_tokens gets --max-tokens within
/// --max-tokens-limit.
#[test]
fn sigterm_lets_the_streams_under_way_finish() {
    let mut server = start_with(slow_model_dir(), &["--max-tokens", "64", "--max-tokens-limit", "8"]);
    let (status, body) = post(&server, "/v1/completions", &json!({"prompt": "def f():", "temperature": 0}));
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["usage"]["completion_tokens"], 8, "{body}");
    let long = json!({"prompt": "def f():", "max_tokens": 8, "n": 4, "stream": true}).to_string();
    let mut stream = TcpStream::connect(&server.address).unwrap();
    stream.write_all(&post_request("/v1/completions", long.as_bytes(), None)).unwrap();
    let mut head = [0u8; 12];
    stream.read_exact(&mut head).unwrap();
    assert_eq!(&head, b"HTTP/1.1 200");
    let term = Command::new("kill").args(["-TERM", &server.child.id().to_string()]).status().unwrap();
    assert!(term.success());
    let mut rest = String::new();
    stream.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
    stream.read_to_string(&mut rest).unwrap();
    assert!(rest.contains("data: [DONE]"), "{rest}");
    assert_eq!(rest.matches("\"finish_reason\":\"length\"").count(), 4, "{rest}");
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    let status = loop {
        if let Some(status) = server.child.try_wait().unwrap() {
            break status;
        }
        assert!(std::time::Instant::now() < deadline, "still running 30 s after SIGTERM");
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(status.success(), "{status}");
    assert_eq!(raw(&server.address, "GET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").0, 0);
}

/// Clients that stop sending (half a header, nothing at all, part of a body) lose their connection
/// after `--read-timeout`, so they cannot hold the server's connections; answers are not cut.
#[test]
fn slow_clients_are_cut_off() {
    let server = start_with(slow_model_dir(), &["--read-timeout", "1"]);
    let closed_within = |sent: &[u8]| {
        let mut stream = TcpStream::connect(&server.address).unwrap();
        stream.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
        stream.write_all(sent).unwrap();
        let mut answer = Vec::new();
        let read = stream.read_to_end(&mut answer);
        assert!(read.is_ok(), "{sent:?}: still open after 20 s ({read:?})");
        String::from_utf8_lossy(&answer).into_owned()
    };
    closed_within(b"");
    closed_within(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\n");
    let part =
        b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n{";
    let answer = closed_within(part);
    assert!(answer.starts_with("HTTP/1.1 408") && answer.contains("did not arrive within 1 s"), "{answer}");
    // The timeout covers reading requests, not answering them: a client that reads a stream's
    // first bytes, then nothing for longer than the timeout, still gets all of it.
    let long = json!({"prompt": "def f():", "max_tokens": 64, "n": 4, "stream": true});
    let mut stream = TcpStream::connect(&server.address).unwrap();
    stream.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
    stream.write_all(&post_request("/v1/completions", long.to_string().as_bytes(), None)).unwrap();
    let mut first = [0u8; 64];
    stream.read_exact(&mut first).unwrap();
    std::thread::sleep(Duration::from_millis(1500));
    let mut rest = Vec::new();
    stream.read_to_end(&mut rest).unwrap();
    let answer = String::from_utf8_lossy(&[&first[..], &rest].concat()).into_owned();
    assert!(answer.starts_with("HTTP/1.1 200") && answer.contains("data: [DONE]"), "{answer}");
}

/// The key guards every endpoint but /health; a full queue answers 429; a client that goes away
/// frees its place within a step; a thousand connections at once leave the server serving.
#[test]
fn key_queue_disconnects_and_a_thousand_connections() {
    let server =
        start_with(slow_model_dir(), &["--api-key-env", "WIZARD_TEST_KEY", "--max-batch", "2", "--max-waiting", "1"]);
    let body = json!({"prompt": "def f():", "max_tokens": 4}).to_string();
    let status = |key| raw_bytes(&server.address, &post_request("/v1/completions", body.as_bytes(), key)).0;
    assert_eq!((status(None), status(Some("wrong")), status(Some("sekret"))), (401, 401, 200));
    // The scheme's name in any case.
    let lower = post_request("/v1/completions", body.as_bytes(), Some("sekret"));
    let lower = String::from_utf8(lower).unwrap().replace("Bearer sekret", "bearer sekret");
    assert_eq!(raw(&server.address, &lower).0, 200);
    assert_eq!(raw(&server.address, "GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").0, 401);

    // Three long streams fill batch 2 + 1 waiting: the fourth request is refused.
    let long = json!({"prompt": "def f():", "max_tokens": 240, "stream": true}).to_string();
    let open_stream = || {
        let mut stream = TcpStream::connect(&server.address).unwrap();
        stream.write_all(&post_request("/v1/completions", long.as_bytes(), Some("sekret"))).unwrap();
        let mut head = [0u8; 12];
        stream.read_exact(&mut head).unwrap();
        assert_eq!(&head, b"HTTP/1.1 200");
        stream
    };
    let held: Vec<TcpStream> = (0..3).map(|_| open_stream()).collect();
    assert_eq!(status(Some("sekret")), 429);
    // Gone clients free their places: their sequences stop long before their 3 x 240 tokens.
    drop(held);
    let metrics = || {
        raw(
            &server.address,
            "GET /metrics HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer sekret\r\nConnection: close\r\n\r\n",
        )
        .1
    };
    common::wait_until("the gone clients' sequences end", Duration::from_secs(30), || {
        metric(&metrics(), "wizard_requests_in_flight") == 0.0
    });
    let generated = metric(&metrics(), "wizard_generated_tokens_total");
    assert!(generated < 600.0, "{generated} tokens generated for clients that left");
    assert_eq!(status(Some("sekret")), 200);
    // A request of more prompts than the batch reserves a batch's worth of the queue and leaves the
    // rest to others: clients beside it are served while it runs, the ones beyond the queue's room
    // refused, and they do not starve its later prompts.
    let big = json!({"prompt": vec!["def f():"; 6], "max_tokens": 200, "stream": true}).to_string();
    let mut stream = TcpStream::connect(&server.address).unwrap();
    stream.write_all(&post_request("/v1/completions", big.as_bytes(), Some("sekret"))).unwrap();
    let mut head = [0u8; 12];
    stream.read_exact(&mut head).unwrap();
    assert_eq!(&head, b"HTTP/1.1 200");
    let mut rest = Vec::new();
    stream.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
    use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering::Relaxed};
    let (big_done, served, refused) = (AtomicBool::new(false), AtomicUsize::new(0), AtomicUsize::new(0));
    std::thread::scope(|scope| {
        // More clients than the one place the big request leaves.
        for _ in 0..4 {
            scope.spawn(|| {
                while !big_done.load(Relaxed) {
                    match status(Some("sekret")) {
                        200 => served.fetch_add(1, Relaxed),
                        429 => {
                            std::thread::sleep(Duration::from_millis(20));
                            refused.fetch_add(1, Relaxed)
                        }
                        other => panic!("status {other} beside a big request"),
                    };
                }
            });
        }
        let read = stream.read_to_end(&mut rest);
        big_done.store(true, Relaxed);
        read.expect("the big request ends while other clients keep the queue full");
    });
    let (served, refused) = (served.load(Relaxed), refused.load(Relaxed));
    assert!(served > 0 && refused > 0, "beside the big request: {served} served, {refused} refused");
    let rest = String::from_utf8_lossy(&rest);
    assert_eq!(rest.matches("\"finish_reason\":\"").count(), 6, "every prompt finished: {rest}");

    // A thousand connections at once: each gets an answer (200 or 429), none hangs; then it serves.
    let answers: Vec<u16> = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..1000).map(|_| scope.spawn(|| status(Some("sekret")))).collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    assert!(
        answers.iter().all(|s| *s == 200 || *s == 429),
        "{:?}",
        answers.iter().filter(|s| !matches!(s, 200 | 429)).collect::<Vec<_>>()
    );
    assert!(answers.contains(&429) && answers.contains(&200));
    common::wait_until("the burst drains", Duration::from_secs(30), || {
        metric(&metrics(), "wizard_requests_in_flight") == 0.0
    });
    let (code, text) = raw_bytes(&server.address, &post_request("/v1/completions", body.as_bytes(), Some("sekret")));
    assert_eq!(code, 200, "{text}\n{}", metrics());
}

/// Browser clients: with `--cors-origin`, an allowed origin's preflight is answered without the key
/// and every answer to it (errors too) is marked readable by it; other origins, and a server without
/// the flag, get no such mark; a malformed origin is refused before the model loads.
#[test]
fn browsers_from_allowed_origins() {
    // Given as a user may write them; sent as browsers do.
    let flags = [
        "--api-key-env",
        "WIZARD_TEST_KEY",
        "--cors-origin",
        "http://localhost:3000",
        "--cors-origin",
        "https://UI.example/",
    ];
    let allowed = ["http://localhost:3000", "https://ui.example"];
    let server = start(&flags);
    let preflight = |address: &str, origin: &str| {
        let request = format!(
            "OPTIONS /v1/completions HTTP/1.1\r\nHost: x\r\nOrigin: {origin}\r\nAccess-Control-Request-Method: POST\r\n\
             Access-Control-Request-Headers: authorization, content-type, x-stainless-os\r\nConnection: close\r\n\r\n"
        );
        exchange(address, request.as_bytes()).to_ascii_lowercase()
    };
    let body = json!({"prompt": "def f():", "max_tokens": 2}).to_string();
    let post_from = |origin: &str, key| {
        let request = String::from_utf8(post_request("/v1/completions", body.as_bytes(), key)).unwrap();
        let request = request.replacen("Host: x\r\n", &format!("Host: x\r\nOrigin: {origin}\r\n"), 1);
        exchange(&server.address, request.as_bytes()).to_ascii_lowercase()
    };
    let mark = |origin: &str| format!("access-control-allow-origin: {origin}\r\n");
    for origin in allowed {
        let answer = preflight(&server.address, origin);
        assert!(answer.starts_with("http/1.1 200") && answer.contains(&mark(origin)), "{origin}: {answer}");
        assert!(answer.contains("access-control-allow-methods: get,post"), "{answer}");
        assert!(
            answer.contains("access-control-allow-headers: authorization, content-type, x-stainless-os"),
            "{answer}"
        );
        let answer = post_from(origin, Some("sekret"));
        assert!(answer.starts_with("http/1.1 200") && answer.contains(&mark(origin)), "{origin}: {answer}");
        assert!(answer.contains("access-control-expose-headers: retry-after\r\n"), "{answer}");
        let answer = post_from(origin, None);
        assert!(answer.starts_with("http/1.1 401") && answer.contains(&mark(origin)), "{origin}: {answer}");
    }
    let other = "http://evil.example";
    assert!(!preflight(&server.address, other).contains("access-control-allow-origin"));
    assert!(!post_from(other, Some("sekret")).contains("access-control-allow-origin"));
    let plain = start(&[]);
    let answer = preflight(&plain.address, allowed[0]);
    assert!(answer.starts_with("http/1.1 405") && !answer.contains("access-control-allow-origin"), "{answer}");

    for bad in ["localhost:3000", "http://x/path", "ftp://x"] {
        let args = ["serve", "--http", "0", "--model", "/nonexistent", "--cors-origin", bad];
        let expected = format!("--cors-origin {bad:?}");
        common::check_failure(&common::wizard(&args), args, &[&expected, "scheme://host[:port]"]);
    }
}

/// `wizard evolve --base-url` and the `openai` package are real clients of the server.
#[test]
fn evolve_and_the_openai_package_as_clients() {
    let server = start(&[]);
    let base = format!("http://{}/v1", server.address);
    let work = tempfile::tempdir().unwrap();
    let seeds = work.path().join("seeds.jsonl");
    let shipped: Vec<&str> = evolve::seeds::DEFAULT_SEEDS.lines().take(3).collect();
    std::fs::write(&seeds, shipped.join("\n")).unwrap();
    let db = work.path().join("run.db");
    let args = [
        "evolve",
        "--db",
        db.to_str().unwrap(),
        "--base-url",
        &base,
        "--model",
        "tiny",
        "--rounds",
        "1",
        "--seeds",
        seeds.to_str().unwrap(),
        "--no-decontaminate",
        "--max-tokens",
        "16",
        "--concurrency",
        "4",
    ];
    let output = common::wizard_command(&args).env_remove("OPENAI_API_KEY").output().unwrap();
    let table = common::stdout_of(&output, args);
    assert!(table.contains("round"), "{table}");
    assert_eq!(
        common::count(&db, "SELECT count(*) FROM items WHERE status NOT IN ('accepted', 'rejected', 'removed')"),
        0
    );
    // Every seed's evolution was answered by the server (random text then fails the rules).
    let answers = common::count(&db, "SELECT count(*) FROM answers");
    assert!(answers >= 3, "{answers} answers\n{table}");
    let (_, metrics) = raw(&server.address, "GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
    let served = metric(&metrics, "wizard_requests_total{endpoint=\"/v1/chat/completions\",status=\"200\"}");
    assert!(served >= answers as f64, "{metrics}");

    let script = r#"
import sys, openai
client = openai.OpenAI(base_url=sys.argv[1], api_key="unused")
whole = client.completions.create(model="tiny", prompt="def f():", max_tokens=8, temperature=0)
streamed = "".join(c.choices[0].text for c in client.completions.create(model="tiny", prompt="def f():", max_tokens=8, temperature=0, stream=True) if c.choices)
assert whole.choices[0].text == streamed, (whole.choices[0].text, streamed)
assert whole.usage.completion_tokens == 8, whole.usage
# Scoring as lm-evaluation-harness does: the prompt echoed with its logprobs, the first None.
scored = client.completions.create(model="tiny", prompt="def f():\n    return 1", max_tokens=0, echo=True, logprobs=1)
logprobs = scored.choices[0].logprobs
assert logprobs.token_logprobs[0] is None and all(l < 0 for l in logprobs.token_logprobs[1:]), logprobs
assert "".join(logprobs.tokens) == scored.choices[0].text == "def f():\n    return 1", logprobs
streamed = [c.choices[0].logprobs for c in client.completions.create(model="tiny", prompt="def f():", max_tokens=6, temperature=0, logprobs=2, stream=True) if c.choices and c.choices[0].logprobs]
assert sum(len(l.tokens) for l in streamed) == 6, streamed
# Alternatives most likely first, as OpenAI lists them, whole and streamed.
ranked = client.completions.create(model="tiny", prompt="def f():", max_tokens=6, temperature=0.8, seed=3, logprobs=5)
tops = ranked.choices[0].logprobs.top_logprobs + [t for l in streamed for t in l.top_logprobs]
assert all(list(t.values()) == sorted(t.values(), reverse=True) for t in tops), tops
chat = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "Hi"}], max_tokens=4)
assert chat.choices[0].message.role == "assistant"
try:
    client.completions.create(model="tiny", prompt="x", max_tokens=4, n=0)
    raise SystemExit("n = 0 was accepted")
except openai.BadRequestError as error:
    assert "n must be" in str(error), error
print("ok")
"#;
    assert_eq!(common::python(script, &[std::ffi::OsStr::new(&base)]).trim(), "ok");
}

/// With `--port`, an editor's language-server session runs beside HTTP on the same engine.
#[test]
fn language_server_beside_http_shares_the_engine() {
    let lsp_port = free_port();
    let server = start(&["--port", &lsp_port.to_string()]);
    let stream = TcpStream::connect(("127.0.0.1", lsp_port)).unwrap();
    stream.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
    let mut reader = std::io::BufReader::new(stream.try_clone().unwrap());
    let mut writer = stream;
    let uri = "file:///work/a.py";
    let answer_to = |id: i64, reader: &mut std::io::BufReader<TcpStream>| loop {
        let message = common::lsp::read_message(reader).expect("the server answers");
        if message["id"] == id {
            break message;
        }
    };
    let initialize = json!({"jsonrpc": "2.0", "id": 1, "method": "initialize", "params": {"capabilities": {}}});
    common::lsp::write_message(&mut writer, &initialize);
    answer_to(1, &mut reader);
    let messages = [
        json!({"jsonrpc": "2.0", "method": "initialized", "params": {}}),
        json!({"jsonrpc": "2.0", "method": "textDocument/didOpen", "params": {"textDocument":
            {"uri": uri, "languageId": "python", "version": 1, "text": "def function_3(value):\n    "}}}),
        json!({"jsonrpc": "2.0", "id": 2, "method": "textDocument/inlineCompletion", "params": {
            "textDocument": {"uri": uri}, "position": {"line": 1, "character": 4}, "context": {"triggerKind": 1}}}),
    ];
    for message in &messages {
        common::lsp::write_message(&mut writer, message);
    }
    let answer = answer_to(2, &mut reader);
    assert!(answer["result"][0]["insertText"].is_string(), "{answer}");
    let (_, metrics) = raw(&server.address, "GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
    assert!(metric(&metrics, "wizard_generated_tokens_total") > 0.0, "{metrics}");
    assert!(!metrics.contains("wizard_requests_total{endpoint"), "no HTTP completion was asked for:\n{metrics}");
}

/// A model directory whose tokenizer_config.json has a chat template is prompted with it.
#[test]
fn the_tokenizers_chat_template() {
    let work = tempfile::tempdir().unwrap();
    for entry in std::fs::read_dir(model_dir()).unwrap() {
        let entry = entry.unwrap();
        std::fs::copy(entry.path(), work.path().join(entry.file_name())).unwrap();
    }
    let template = "{% for m in messages %}### {{ m.role }}: {{ m.content }}\n{% endfor %}{% if add_generation_prompt %}### assistant:{% endif %}";
    std::fs::write(work.path().join("tokenizer_config.json"), json!({"chat_template": template}).to_string()).unwrap();
    let server = start_with(work.path(), &[]);
    let messages = json!([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "def f"}]);
    let (status, chat) = post(&server, "/v1/chat/completions", &json!({"messages": messages, "max_tokens": 2}));
    assert_eq!(status, 200, "{chat}");
    let rendered = "### system: Be brief.\n### user: def f\n### assistant:";
    let (_, plain) = post(&server, "/v1/completions", &json!({"prompt": rendered, "max_tokens": 2}));
    assert_eq!(chat["usage"]["prompt_tokens"], plain["usage"]["prompt_tokens"]);
    // A template that raises answers 400 naming it.
    let raising = "{{ raise_exception('only user turns') }}";
    std::fs::write(work.path().join("tokenizer_config.json"), json!({"chat_template": raising}).to_string()).unwrap();
    drop(server);
    let server = start_with(work.path(), &[]);
    let (status, error) = post(&server, "/v1/chat/completions", &json!({"messages": messages, "max_tokens": 2}));
    assert_eq!(status, 400, "{error}");
    assert!(error["error"]["message"].as_str().unwrap().contains("only user turns"), "{error}");
}
