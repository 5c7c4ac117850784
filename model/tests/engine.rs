//! The shared inference engine: batch-invariant greedy output, samples that share a prefill,
//! cancellation, a bounded queue, and a failing request that leaves the others running.
use std::sync::atomic::Ordering;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use model::config::ModelConfig;
use model::engine::{Engine, EngineConfig, Event, Request, Speculation, SubmitError};
use model::generate::{generate, Finish, GenerateConfig, NoStop, StopCriterion};
use model::gpt_bigcode::GptBigCode;
use model::sampling::Sampling;
use tch::Device;
use tokio::sync::mpsc::UnboundedReceiver;

/// The same random model every time (tests run in parallel; libtorch's generator is global).
fn tiny_model() -> model::Result<GptBigCode> {
    static SEEDING: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let _seeding = SEEDING.lock().unwrap_or_else(|e| e.into_inner());
    tch::manual_seed(7);
    let config = ModelConfig {
        vocab_size: 97,
        n_positions: 128,
        n_embd: 64,
        n_layer: 3,
        n_head: 4,
        initializer_range: 0.3,
        bos_token_id: Some(0),
        eos_token_id: Some(0),
        ..ModelConfig::default()
    };
    GptBigCode::new(config, Device::Cpu)
}

/// The same model with bf16 dense weights (on AMX CPUs their products run on tiles).
fn tiny_bf16_model() -> model::Result<GptBigCode> {
    let mut model = tiny_model()?;
    model.narrow_dense_weights()?;
    Ok(model)
}

fn engine(config: EngineConfig) -> Engine {
    Engine::start(config, tiny_model).unwrap()
}

fn prompt(i: usize) -> Vec<i64> {
    (0..3 + 5 * i).map(|j| ((j * 31 + i * 17) % 96 + 1) as i64).collect()
}

fn request(prompt: Vec<i64>, sampling: Sampling, n: usize) -> Request {
    Request { n, sampling, ..Request::new(prompt, 24) }
}

/// Collects every sample's tokens from a submitted request.
fn collect(mut events: UnboundedReceiver<Event>, n: usize) -> Vec<Vec<i64>> {
    let mut samples = vec![Vec::new(); n];
    while let Some(event) = events.blocking_recv() {
        match event {
            Event::Token { sample, token, .. } => samples[sample].push(token),
            Event::Failed(message) => panic!("{message}"),
            _ => {}
        }
    }
    samples
}

/// Greedy tokens of 16 requests are the same alone, all in one batch, and from `generate`, with
/// fp32 and with bf16 dense weights.
#[test]
fn greedy_output_does_not_depend_on_the_batch() {
    check_batch_invariance(tiny_model);
    check_batch_invariance(tiny_bf16_model);
}

fn check_batch_invariance(make_model: fn() -> model::Result<GptBigCode>) {
    let engine = Engine::start(EngineConfig { prefill_chunk: 32, ..EngineConfig::default() }, make_model).unwrap();
    let alone: Vec<Vec<i64>> =
        (0..16).map(|i| engine.generate(request(prompt(i), Sampling::greedy(), 1)).unwrap().remove(0).0).collect();
    let counter = |c: &std::sync::atomic::AtomicUsize| c.load(Ordering::Relaxed);
    let (steps, rows) = (counter(&engine.counters().steps), counter(&engine.counters().step_rows));
    // All 16 queue while the engine is held, so they start together on any machine.
    let (release, gate) = hold(&engine, prompt(0), 2);
    let submitted: Vec<_> =
        (0..16).map(|i| engine.submit(request(prompt(i), Sampling::greedy(), 1)).unwrap()).collect();
    release.send(()).unwrap();
    assert_eq!(collect(gate, 1)[0].len(), 2);
    let together: Vec<Vec<i64>> = submitted.into_iter().map(|events| collect(events, 1).remove(0)).collect();
    assert_eq!(together, alone);
    let (steps, rows) = (counter(&engine.counters().steps) - steps, counter(&engine.counters().step_rows) - rows);
    assert!(rows > 8 * steps, "16 requests ran {rows} rows in {steps} steps");
    assert!(alone.iter().all(|tokens| tokens.len() == 24));
    // Chunks of 32 follow the same path as one-shot prefill where the prompt fits a chunk.
    let model = make_model().unwrap();
    let config =
        GenerateConfig { max_new_tokens: 24, num_samples: 1, sampling: Sampling::greedy(), eos_token_id: None };
    let expected = generate(&model, &prompt(1), &config, &mut NoStop).unwrap().remove(0).tokens;
    assert_eq!(alone[1], expected);
}

/// n samples share one prefill and equal n single requests with the seeds they imply.
#[test]
fn samples_share_a_prefill_and_keep_their_seeds() {
    let engine = engine(EngineConfig::default());
    let sampling = Sampling { temperature: 1.0, top_k: Some(20), top_p: Some(0.9), seed: 40 };
    let together = collect(engine.submit(request(prompt(3), sampling.clone(), 4)).unwrap(), 4);
    for (i, tokens) in together.iter().enumerate() {
        let single = Sampling { seed: 40 + i as u64, ..sampling.clone() };
        assert_eq!(&engine.generate(request(prompt(3), single, 1)).unwrap()[0].0, tokens, "sample {i}");
    }
    assert_ne!(together[0], together[1], "different seeds drew the same 24 tokens");
}

/// Stops after `after` tokens, or panics there when `panic` is set.
struct After {
    after: usize,
    panic: bool,
}

impl StopCriterion for After {
    fn should_stop(&mut self, _: usize, tokens: &[i64]) -> bool {
        assert!(!(self.panic && tokens.len() == self.after), "stop criterion panic");
        tokens.len() >= self.after
    }
}

#[test]
fn stops_panics_cancellation_and_a_full_queue() {
    let engine = engine(EngineConfig { max_batch: 2, max_waiting: 1, prefill_chunk: 64 });
    let stopped =
        Request { stop: Some(Box::new(After { after: 5, panic: false })), ..request(prompt(2), Sampling::greedy(), 1) };
    let out = engine.generate(stopped).unwrap();
    assert_eq!((out[0].0.len(), out[0].1), (5, Finish::Stop));
    let eos = engine.generate(request(prompt(2), Sampling::greedy(), 1)).unwrap()[0].0[3];
    let ended = Request { stop_tokens: vec![eos], ..request(prompt(2), Sampling::greedy(), 1) };
    let out = engine.generate(ended).unwrap();
    assert_eq!(out[0].1, Finish::Eos);
    assert!(!out[0].0.contains(&eos) && out[0].0.len() <= 3);
    // With logprobs, the stop token is reported with its own, just before the end.
    let scored = Request { stop_tokens: vec![eos], logprobs: Some(1), ..request(prompt(2), Sampling::greedy(), 1) };
    let mut events = engine.submit(scored).unwrap();
    let mut last_two = Vec::new();
    while let Some(event) = events.blocking_recv() {
        last_two.push(event);
        if last_two.len() > 2 {
            last_two.remove(0);
        }
    }
    match &last_two[..] {
        [Event::StopToken { sample: 0, token, logprob }, Event::Finished { sample: 0, finish: Finish::Eos }] => {
            assert_eq!((*token, logprob.top[0].0), (eos, eos), "greedy: the most likely token");
        }
        other => panic!("{other:?}"),
    }

    // A panicking request fails alone; its neighbour finishes.
    let panicking =
        Request { stop: Some(Box::new(After { after: 3, panic: true })), ..request(prompt(4), Sampling::greedy(), 1) };
    let neighbour = engine.submit(request(prompt(5), Sampling::greedy(), 1)).unwrap();
    let failed = engine.generate(panicking);
    assert!(matches!(failed, Err(SubmitError::Invalid(ref m)) if m.contains("stop criterion panic")), "{failed:?}");
    assert_eq!(collect(neighbour, 1)[0].len(), 24);
    // A failing sample ends its request for all samples: one Failed, the last event, sent once the
    // place is back.
    let pair = Request {
        stop: Some(Box::new(After { after: 3, panic: true })),
        ..request(prompt(4), Sampling { temperature: 1.0, top_k: None, top_p: None, seed: 1 }, 2)
    };
    let mut events = engine.submit(pair).unwrap();
    let mut last = None;
    while let Some(event) = events.blocking_recv() {
        if matches!(event, Event::Failed(_)) {
            assert_eq!(engine.in_flight(), 0, "the place is back before the failure is told");
        }
        assert!(!matches!(last, Some(Event::Failed(_))), "{event:?} after the failure");
        last = Some(event);
    }
    assert!(matches!(last, Some(Event::Failed(ref m)) if m.contains("stop criterion panic")), "{last:?}");

    // Batch 2 + 1 waiting: the fourth is refused; dropping receivers frees the places.
    let long = |i| Request { max_new_tokens: 100, ..request(prompt(i), Sampling::greedy(), 1) };
    let (release, first) = hold(&engine, prompt(0), 100);
    let held: Vec<_> = (1..3).map(|i| engine.submit(long(i)).unwrap()).collect();
    assert!(matches!(engine.submit(long(3)), Err(SubmitError::Busy(3))));
    assert!(matches!(engine.reserve(1), Err(SubmitError::Busy(3))));
    drop((first, held, release));
    // Places reserved (as many as are free) are the holder's: its requests go in while new ones are
    // refused, and dropping the reservation gives the places back.
    let deadline = Instant::now() + Duration::from_secs(10);
    while engine.in_flight() > 0 {
        assert!(Instant::now() < deadline, "the dropped requests still hold {} places", engine.in_flight());
        std::thread::yield_now();
    }
    // Held at its first token, so that its place stays taken while the reservation is made.
    let (release, held) = hold(&engine, prompt(1), 100);
    let reservation = engine.reserve(5).unwrap();
    assert_eq!(reservation.places(), 2, "as many as are free");
    assert!(matches!(engine.submit(long(4)), Err(SubmitError::Busy(3))));
    let reserved: Vec<_> = (2..4)
        .map(|i| engine.submit_reserved(request(prompt(i), Sampling::greedy(), 1), &reservation).unwrap())
        .collect();
    drop(release);
    assert_eq!(collect(held, 1)[0].len(), 100);
    for events in reserved {
        assert_eq!(collect(events, 1)[0].len(), 24);
    }
    assert_eq!(engine.in_flight(), 2, "the reservation's places");
    drop(reservation);
    assert_eq!(engine.in_flight(), 0);

    // Refused before queueing: an empty prompt, n = 0, a prompt as long as the context, bad sampling,
    // an id outside the vocabulary, log-probabilities on the speculative path.
    let speculative = Speculation { gamma: 4, reuse_prefix: false, fixed: true };
    for (bad, message) in [
        (request(Vec::new(), Sampling::greedy(), 1), "empty"),
        (request(vec![1, 97], Sampling::greedy(), 1), "token id 97 is outside the model's vocabulary of 97"),
        (request(vec![1, -1], Sampling::greedy(), 1), "token id -1"),
        (
            Request {
                prompt_logprobs: Some(1),
                speculation: Some(speculative),
                ..request(prompt(1), Sampling::greedy(), 1)
            },
            "speculative path",
        ),
        (request(prompt(1), Sampling::greedy(), 0), "n must be"),
        (request(vec![1; 128], Sampling::greedy(), 1), "context"),
        (request(prompt(1), Sampling { temperature: -1.0, ..Sampling::greedy() }, 1), "temperature"),
    ] {
        let refused = engine.submit(bad).err().map(|e| e.to_string()).unwrap_or_default();
        assert!(refused.contains(message), "{refused}");
    }
}

/// A prompt's log-probabilities come once, before its tokens, whatever the prefill's chunks, and
/// match the logits of the whole prompt in one pass; asking for them changes no token.
#[test]
fn prompt_logprobs_do_not_depend_on_chunks() {
    let prompt: Vec<i64> = prompt(9);
    let model = tiny_model().unwrap();
    let ids = tch::Tensor::from_slice(&prompt).unsqueeze(0);
    let logits = tch::no_grad(|| model.forward_full(&ids, model::gpt_bigcode::Dropout::Off)).unwrap();
    let expected: Vec<f32> = logits.log_softmax(-1, tch::Kind::Float).reshape([-1]).try_into().unwrap();
    let plain = engine(EngineConfig::default()).generate(request(prompt.clone(), Sampling::greedy(), 2)).unwrap();
    for chunk in [1, 7, 512] {
        let engine = engine(EngineConfig { prefill_chunk: chunk, ..EngineConfig::default() });
        let scored = Request { prompt_logprobs: Some(2), ..request(prompt.clone(), Sampling::greedy(), 2) };
        let mut events = engine.submit(scored).unwrap();
        let (mut logprobs, mut tokens) = (Vec::new(), vec![Vec::new(); 2]);
        while let Some(event) = events.blocking_recv() {
            match event {
                Event::PromptLogprobs { sample, logprobs: got } => {
                    assert!(logprobs.is_empty() && tokens[0].is_empty() && sample == 0, "once, first");
                    logprobs = got;
                }
                Event::Token { sample, token, .. } => tokens[sample].push(token),
                Event::Failed(message) => panic!("{message}"),
                _ => {}
            }
        }
        assert_eq!(logprobs.len(), prompt.len() - 1, "chunk {chunk}");
        for (position, scored) in logprobs.iter().enumerate() {
            let reference = expected[position * 97 + prompt[position + 1] as usize];
            assert!(
                (scored.logprob - reference).abs() < 1e-4,
                "chunk {chunk}, token {position}: {scored:?} {reference}"
            );
            assert_eq!(scored.top.len(), 2);
            assert!(scored.top[0].1 >= scored.top[1].1 && scored.top[0].1 >= scored.logprob, "{scored:?}");
        }
        assert_eq!(tokens, plain.iter().map(|(t, _)| t.clone()).collect::<Vec<_>>(), "chunk {chunk}");
    }
}

/// A speculative request alone is decoded speculatively (with the kept prefix of the last one) and
/// gives the plain greedy tokens; beside others it joins the batch, with the same tokens.
#[test]
fn speculation_alone_and_in_a_batch() {
    let engine = engine(EngineConfig::default());
    let speculative = |i: usize| Request {
        speculation: Some(Speculation { gamma: 4, reuse_prefix: true, fixed: true }),
        ..request(prompt(i), Sampling::greedy(), 1)
    };
    for i in [2, 2, 5] {
        let expected = engine.generate(request(prompt(i), Sampling::greedy(), 1)).unwrap().remove(0).0;
        let mut events = engine.submit(speculative(i)).unwrap();
        let (mut tokens, mut figures) = (Vec::new(), None);
        while let Some(event) = events.blocking_recv() {
            match event {
                Event::Token { token, .. } => tokens.push(token),
                Event::Speculated(f) => figures = Some(f),
                Event::Failed(message) => panic!("{message}"),
                _ => {}
            }
        }
        assert_eq!(tokens, expected, "prompt {i}");
        let figures = figures.expect("decoded speculatively");
        assert!(figures.drafted > 0, "{figures:?}");
    }
    // Beside a running request, it is batched.
    let expected = engine.generate(request(prompt(3), Sampling::greedy(), 1)).unwrap().remove(0).0;
    let (release, long) = hold(&engine, prompt(1), 100);
    let mut events = engine.submit(speculative(3)).unwrap();
    release.send(()).unwrap();
    let mut tokens = Vec::new();
    while let Some(event) = events.blocking_recv() {
        match event {
            Event::Token { token, .. } => tokens.push(token),
            Event::Speculated(_) => panic!("speculated beside a running request"),
            _ => {}
        }
    }
    assert_eq!(tokens, expected);
    drop(long);
}

/// Submits a request that holds the engine at its first token until the returned sender is used
/// (or dropped), and returns once it holds: what is submitted meanwhile queues beside a running
/// request, however loaded the machine.
fn hold(engine: &Engine, prompt: Vec<i64>, max_new_tokens: usize) -> (mpsc::Sender<()>, UnboundedReceiver<Event>) {
    let (entered, wait_for_entered) = mpsc::channel();
    let (release, wait_for_release) = mpsc::channel();
    let holding = Hold { entered, release: Some(wait_for_release) };
    let request = Request { max_new_tokens, stop: Some(Box::new(holding)), ..request(prompt, Sampling::greedy(), 1) };
    let events = engine.submit(request).unwrap();
    wait_for_entered.recv_timeout(Duration::from_secs(60)).expect("the engine reached the held request");
    (release, events)
}

/// Never stops a sample; blocks at its first token until released.
struct Hold {
    entered: mpsc::Sender<()>,
    release: Option<mpsc::Receiver<()>>,
}

impl StopCriterion for Hold {
    fn should_stop(&mut self, _: usize, _: &[i64]) -> bool {
        if let Some(release) = self.release.take() {
            let _ = self.entered.send(());
            let _ = release.recv_timeout(Duration::from_secs(60));
        }
        false
    }
}
