//! A TCP relay on one memory budget, on 127.0.0.1 only.
//!
//! Client tasks send checksummed streams to a relay. For every connection the relay reads
//! each chunk into a pooled allocation (`pool.allocate(n).await`, `into_filled`, tokio's
//! `read_buf`), freezes it into `bytes::Bytes` without a copy, and forwards it through a
//! bounded channel to a writer task, which writes it to a sink connection; the `Bytes` gives
//! its bytes back to the budget when the write is done. The sink checks every frame's
//! checksum and that every stream arrived whole and in order. The pool's budget is the only
//! thing that caps the relay's memory: when it is spent, readers wait (in FIFO order) and
//! stop reading their sockets, and TCP pushes back on the clients.
//!
//! ```text
//! cargo run --release --example proxy
//! cargo run --release --example proxy -- --clients 64 --mib-per-client 8 --budget-kib 512
//! ```
//!
//! It prints progress about once a second and a summary: bytes relayed, throughput, the peak
//! bytes in use against the budget (asserted never above it), how long `allocate` waited
//! (p50/p99) and the checksum verdict. It gives up after `--max-secs` and exits non-zero on
//! any verification failure.

use std::pin::pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::task::Poll;
use std::time::{Duration, Instant};

use bytes::Bytes;
use membudget::{BufPool, BufPoolCfg, BufferSize};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;

#[derive(Clone, Copy, Debug)]
struct Options {
    clients: usize,
    mib_per_client: usize,
    chunk: usize,
    budget_kib: usize,
    channel: usize,
    max_frame: usize,
    max_secs: u64,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            clients: 16,
            mib_per_client: 64,
            chunk: 64 << 10,
            budget_kib: 1024,
            channel: 8,
            max_frame: 48 << 10,
            max_secs: 25,
        }
    }
}

const USAGE: &str = "usage: proxy [--clients N] [--mib-per-client N] [--chunk BYTES] \
[--budget-kib N] [--channel N] [--max-frame BYTES] [--max-secs N]";

fn parse_options() -> Result<Options, String> {
    let mut options = Options::default();
    let mut args = std::env::args().skip(1);
    while let Some(flag) = args.next() {
        if flag == "-h" || flag == "--help" {
            return Err(USAGE.to_owned());
        }
        let value = args
            .next()
            .ok_or_else(|| format!("{flag} needs a value\n{USAGE}"))?;
        let number: usize = value
            .parse()
            .map_err(|_| format!("{flag}: {value:?} is not a number\n{USAGE}"))?;
        match flag.as_str() {
            "--clients" => options.clients = number,
            "--mib-per-client" => options.mib_per_client = number,
            "--chunk" => options.chunk = number,
            "--budget-kib" => options.budget_kib = number,
            "--channel" => options.channel = number,
            "--max-frame" => options.max_frame = number,
            "--max-secs" => options.max_secs = number as u64,
            _ => return Err(format!("unknown flag {flag}\n{USAGE}")),
        }
    }
    if [
        options.clients,
        options.mib_per_client,
        options.channel,
        options.max_frame,
        options.max_secs as usize,
    ]
    .contains(&0)
        || options.chunk < 8
    {
        return Err(format!(
            "every number must be at least 1, --chunk at least 8\n{USAGE}"
        ));
    }
    if options.max_frame > u32::MAX as usize {
        return Err(format!("--max-frame must fit in 32 bits\n{USAGE}"));
    }
    if options.budget_kib.checked_mul(1 << 10).is_none()
        || (options.mib_per_client as u64)
            .checked_mul(1 << 20)
            .is_none()
    {
        return Err(format!(
            "--budget-kib or --mib-per-client is too large\n{USAGE}"
        ));
    }
    Ok(options)
}

/// The buffer size for `chunk`-byte reads: the largest one not above it, so a chunk is a
/// whole number of buffers with at most one buffer's worth of slack.
fn buffer_size_for(chunk: usize) -> BufferSize {
    let mut size = BufferSize::S8;
    while let Some(next) = size.bytes().checked_mul(2) {
        match BufferSize::try_from(next) {
            Ok(bigger) if next <= chunk => size = bigger,
            _ => break,
        }
    }
    size
}

// ---- the wire format: a client id, then frames ----
//
// stream = client id (u64 LE), frame*
// frame  = payload length (u32 LE), sequence number (u32 LE), payload, checksum (u64 LE)
// The checksum covers the 8 header bytes and the payload. The relay knows none of this: it
// moves bytes, cut wherever the socket reads happen to end.

const HEADER: usize = 8;
const TRAILER: usize = 8;

fn checksum(header: &[u8], payload: &[u8]) -> u64 {
    const PRIME: u64 = 0x0000_0100_0000_01B3;
    let mut hash = 0xCBF2_9CE4_8422_2325 ^ u64::from_le_bytes(header.try_into().unwrap());
    let mut words = payload.chunks_exact(8);
    for word in &mut words {
        let word = u64::from_le_bytes(word.try_into().unwrap());
        hash = (hash ^ word).wrapping_mul(PRIME).rotate_left(23);
    }
    for &byte in words.remainder() {
        hash = (hash ^ u64::from(byte)).wrapping_mul(PRIME);
    }
    hash ^ payload.len() as u64
}

/// A cheap generator for payloads and frame sizes.
struct XorShift(u64);

impl XorShift {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    fn fill(&mut self, out: &mut [u8]) {
        for chunk in out.chunks_mut(8) {
            let word = self.next().to_le_bytes();
            chunk.copy_from_slice(&word[..chunk.len()]);
        }
    }
}

/// What one client sent, for the sink to be checked against.
#[derive(Clone, Copy, Debug, Default)]
struct Sent {
    bytes: u64,
    frames: u32,
}

/// What the sink found in one stream.
#[derive(Debug, Default)]
struct Received {
    client: u64,
    bytes: u64,
    frames: u32,
    bad_checksums: u32,
    error: Option<String>,
}

struct Totals {
    relayed_bytes: AtomicU64,
    chunks: AtomicU64,
}

fn main() {
    let options = match parse_options() {
        Ok(options) => options,
        Err(message) => {
            eprintln!("{message}");
            std::process::exit(2);
        }
    };
    let buffer_size = buffer_size_for(options.chunk);
    let buffers_per_chunk = options.chunk.div_ceil(buffer_size.bytes());
    let chunk_bytes = buffers_per_chunk * buffer_size.bytes();
    let cfg = BufPoolCfg {
        buffer_size,
        max_memory: options.budget_kib << 10,
    };
    let pool = match BufPool::try_new(cfg) {
        Ok(pool) => Arc::new(pool),
        Err(error) => {
            eprintln!("invalid budget: {error}");
            std::process::exit(2);
        }
    };
    if chunk_bytes > cfg.max_memory {
        eprintln!(
            "one chunk ({chunk_bytes} bytes) is above the budget ({} bytes)",
            cfg.max_memory
        );
        std::process::exit(2);
    }
    println!(
        "proxy: {} clients x {} MiB through a relay on 127.0.0.1; chunks of {} x {} B, budget \
         {} KiB ({} chunks in flight at most), channel bound {}",
        options.clients,
        options.mib_per_client,
        buffers_per_chunk,
        buffer_size.bytes(),
        options.budget_kib,
        cfg.max_memory / chunk_bytes,
        options.channel,
    );

    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("build the tokio runtime");
    let totals = Arc::new(Totals {
        relayed_bytes: AtomicU64::new(0),
        chunks: AtomicU64::new(0),
    });
    let started = Instant::now();
    let outcome = runtime.block_on(async {
        let progress = tokio::spawn(print_progress(pool.clone(), totals.clone(), started));
        let run = run(options, pool.clone(), buffers_per_chunk, totals.clone());
        let outcome = tokio::time::timeout(Duration::from_secs(options.max_secs), run).await;
        progress.abort();
        outcome
    });
    let elapsed = started.elapsed();
    drop(runtime); // ends whatever a timeout left running, giving its allocations back
    let stats = pool.stats();

    let mut failures = Vec::new();
    let (sent, received, mut waits) = match outcome {
        Ok(Ok(result)) => result,
        Ok(Err(error)) => {
            eprintln!("proxy: FAILED: {error}");
            std::process::exit(1);
        }
        Err(_) => {
            eprintln!(
                "proxy: FAILED: not done within {} s (--max-secs); {stats}",
                options.max_secs
            );
            std::process::exit(1);
        }
    };
    failures.extend(verify(&sent, &received));
    if stats.peak_in_use_bytes > cfg.max_memory {
        failures.push(format!(
            "peak in use {} bytes is above the budget of {}",
            stats.peak_in_use_bytes, cfg.max_memory
        ));
    }
    if stats.in_use_bytes != 0 || stats.outstanding != 0 {
        failures.push(format!("allocations still out at the end: {stats}"));
    }

    let relayed = totals.relayed_bytes.load(Relaxed);
    let chunks = totals.chunks.load(Relaxed);
    let frames: u64 = received.iter().map(|r| u64::from(r.frames)).sum();
    let bad: u64 = received.iter().map(|r| u64::from(r.bad_checksums)).sum();
    waits.sort_unstable_by_key(|wait| wait.0);
    let waited: Vec<Duration> = waits
        .iter()
        .filter(|(_, queued)| *queued)
        .map(|(wait, _)| *wait)
        .collect();
    let all: Vec<Duration> = waits.iter().map(|(wait, _)| *wait).collect();
    let secs = elapsed.as_secs_f64();
    println!("---");
    println!(
        "relayed:      {:.1} MiB in {chunks} chunks in {secs:.2} s = {:.0} MiB/s ({} clients)",
        mib(relayed),
        mib(relayed) / secs,
        options.clients,
    );
    println!(
        "peak in use:  {:.0} KiB of a {} KiB budget ({:.0}%), never above it; {:.1} KiB \
         relayed per chunk on average",
        stats.peak_in_use_bytes as f64 / 1024.0,
        options.budget_kib,
        100.0 * stats.peak_in_use_bytes as f64 / cfg.max_memory as f64,
        relayed as f64 / chunks.max(1) as f64 / 1024.0,
    );
    println!(
        "allocate:     {} calls, {} waited ({:.0}%); pool stats agree: {} waited, max {:?}",
        all.len(),
        waited.len(),
        100.0 * waited.len() as f64 / all.len().max(1) as f64,
        stats.waited_allocations,
        stats.max_wait,
    );
    println!(
        "wait:         p50 {:?}, p99 {:?}, max {:?} (of the calls that waited); \
         p99 of all calls {:?}",
        percentile(&waited, 0.50),
        percentile(&waited, 0.99),
        waited.last().copied().unwrap_or_default(),
        percentile(&all, 0.99),
    );
    println!(
        "checksums:    {frames} frames in {} streams, {bad} bad, {}",
        received.len(),
        if failures.is_empty() {
            "every stream whole and in order: ok"
        } else {
            "FAILED"
        }
    );
    if !failures.is_empty() {
        for failure in &failures {
            eprintln!("proxy: FAILED: {failure}");
        }
        std::process::exit(1);
    }
}

/// The relay, the sink and the clients, to completion. Returns what each client sent, what
/// the sink received per stream, and every `allocate` wait with whether it queued.
async fn run(
    options: Options,
    pool: Arc<BufPool>,
    buffers_per_chunk: usize,
    totals: Arc<Totals>,
) -> Result<(Vec<Sent>, Vec<Received>, Vec<(Duration, bool)>), String> {
    let relay = TcpListener::bind("127.0.0.1:0")
        .await
        .map_err(|e| format!("bind the relay: {e}"))?;
    let sink = TcpListener::bind("127.0.0.1:0")
        .await
        .map_err(|e| format!("bind the sink: {e}"))?;
    let relay_addr = relay.local_addr().map_err(|e| e.to_string())?;
    let sink_addr = sink.local_addr().map_err(|e| e.to_string())?;

    // The sink: one verifying task per stream.
    let sink_task = tokio::spawn(async move {
        let mut streams = tokio::task::JoinSet::new();
        for _ in 0..options.clients {
            let (socket, _) = sink
                .accept()
                .await
                .map_err(|e| format!("sink accept: {e}"))?;
            streams.spawn(verify_stream(socket, options.max_frame));
        }
        let mut received = Vec::new();
        while let Some(stream) = streams.join_next().await {
            received.push(stream.map_err(|e| format!("a sink task failed: {e}"))?);
        }
        Ok::<_, String>(received)
    });

    // The relay: per inbound connection, a reader into pooled memory and a writer to the sink.
    let relay_task = tokio::spawn({
        let totals = totals.clone();
        async move {
            let mut connections = tokio::task::JoinSet::new();
            for _ in 0..options.clients {
                let (inbound, _) = relay
                    .accept()
                    .await
                    .map_err(|e| format!("relay accept: {e}"))?;
                let outbound = TcpStream::connect(sink_addr)
                    .await
                    .map_err(|e| format!("relay connect to the sink: {e}"))?;
                let (sender, receiver) = mpsc::channel::<Bytes>(options.channel);
                connections.spawn(write_chunks(receiver, outbound, totals.clone()));
                connections.spawn(read_chunks(
                    inbound,
                    sender,
                    pool.clone(),
                    buffers_per_chunk,
                ));
            }
            let mut waits = Vec::new();
            while let Some(done) = connections.join_next().await {
                waits.extend(done.map_err(|e| format!("a relay task failed: {e}"))??);
            }
            Ok::<_, String>(waits)
        }
    });

    // The clients.
    let mut clients = tokio::task::JoinSet::new();
    for client in 0..options.clients {
        clients.spawn(send_stream(client as u64, relay_addr, options));
    }
    let mut sent = vec![Sent::default(); options.clients];
    while let Some(done) = clients.join_next().await {
        let (client, what) = done.map_err(|e| format!("a client task failed: {e}"))??;
        sent[client as usize] = what;
    }
    let waits = relay_task
        .await
        .map_err(|e| format!("the relay failed: {e}"))??;
    let received = sink_task
        .await
        .map_err(|e| format!("the sink failed: {e}"))??;
    Ok((sent, received, waits))
}

/// One client: its id, then frames of random sizes with random payloads, at least
/// `mib_per_client` MiB of payload in all.
async fn send_stream(
    client: u64,
    relay: std::net::SocketAddr,
    options: Options,
) -> Result<(u64, Sent), String> {
    let mut socket = TcpStream::connect(relay)
        .await
        .map_err(|e| format!("client {client} connect: {e}"))?;
    let mut rng = XorShift(0x9E37_79B9_7F4A_7C15 ^ (client + 1).wrapping_mul(0xA24B_AED4));
    let mut frame = Vec::with_capacity(HEADER + options.max_frame + TRAILER);
    let mut sent = Sent::default();
    socket
        .write_all(&client.to_le_bytes())
        .await
        .map_err(|e| format!("client {client} write: {e}"))?;
    sent.bytes += 8;
    let target = (options.mib_per_client as u64) << 20;
    let mut payload_bytes = 0;
    while payload_bytes < target {
        let len = 1 + (rng.next() % options.max_frame as u64) as usize;
        frame.clear();
        frame.extend_from_slice(&(len as u32).to_le_bytes());
        frame.extend_from_slice(&sent.frames.to_le_bytes());
        frame.resize(HEADER + len, 0);
        rng.fill(&mut frame[HEADER..]);
        let sum = checksum(&frame[..HEADER], &frame[HEADER..]);
        frame.extend_from_slice(&sum.to_le_bytes());
        socket
            .write_all(&frame)
            .await
            .map_err(|e| format!("client {client} write: {e}"))?;
        sent.bytes += frame.len() as u64;
        sent.frames += 1;
        payload_bytes += len as u64;
    }
    socket
        .shutdown()
        .await
        .map_err(|e| format!("client {client} shutdown: {e}"))?;
    Ok((client, sent))
}

/// The relay's reading half of one connection: each read goes into a pooled allocation, which
/// is frozen and sent on. Returns every `allocate` wait and whether it queued.
async fn read_chunks(
    mut inbound: TcpStream,
    sender: mpsc::Sender<Bytes>,
    pool: Arc<BufPool>,
    buffers_per_chunk: usize,
) -> Result<Vec<(Duration, bool)>, String> {
    let mut waits = Vec::new();
    loop {
        // Poll once by hand to tell a call that queued from one that did not.
        let since = Instant::now();
        let mut allocate = pin!(pool.allocate(buffers_per_chunk));
        let (allocation, queued) = match futures::poll!(allocate.as_mut()) {
            Poll::Ready(allocation) => (allocation, false),
            Poll::Pending => (allocate.await, true),
        };
        waits.push((since.elapsed(), queued));
        let mut filled = allocation
            .map_err(|e| format!("allocate: {e}"))?
            .into_filled();
        let read = inbound
            .read_buf(&mut filled)
            .await
            .map_err(|e| format!("relay read: {e}"))?;
        if read == 0 {
            return Ok(waits); // the client is done; dropping `sender` ends the writer
        }
        if sender.send(filled.freeze()).await.is_err() {
            return Err("the writer stopped early".to_owned());
        }
    }
}

/// The relay's writing half: writes each `Bytes` to the sink, then drops it, which gives its
/// allocation back to the budget.
async fn write_chunks(
    mut receiver: mpsc::Receiver<Bytes>,
    mut outbound: TcpStream,
    totals: Arc<Totals>,
) -> Result<Vec<(Duration, bool)>, String> {
    while let Some(chunk) = receiver.recv().await {
        outbound
            .write_all(&chunk)
            .await
            .map_err(|e| format!("relay write: {e}"))?;
        totals.relayed_bytes.fetch_add(chunk.len() as u64, Relaxed);
        totals.chunks.fetch_add(1, Relaxed);
    }
    outbound
        .shutdown()
        .await
        .map_err(|e| format!("relay shutdown: {e}"))?;
    Ok(Vec::new())
}

/// The sink's check of one stream: parses the frames as the bytes arrive, cut anywhere, and
/// checks each checksum and sequence number.
async fn verify_stream(mut socket: TcpStream, max_frame: usize) -> Received {
    let mut received = Received::default();
    let mut pending: Vec<u8> = Vec::with_capacity(4 * (max_frame + HEADER + TRAILER));
    let mut start = 0; // parsed up to here
    let mut have_id = false;
    let mut chunk = vec![0; 64 << 10];
    loop {
        let read = match socket.read(&mut chunk).await {
            Ok(read) => read,
            Err(e) => {
                received.error = Some(format!("sink read: {e}"));
                return received;
            }
        };
        if read == 0 {
            if start != pending.len() {
                received.error = Some(format!(
                    "stream of client {} ends inside a frame ({} bytes left over)",
                    received.client,
                    pending.len() - start
                ));
            }
            return received;
        }
        received.bytes += read as u64;
        if received.error.is_some() {
            continue; // drain what comes, the verdict is in
        }
        if start > pending.len() / 2 {
            pending.drain(..start);
            start = 0;
        }
        pending.extend_from_slice(&chunk[..read]);
        if !have_id {
            let Some(id) = pending.get(..8) else { continue };
            received.client = u64::from_le_bytes(id.try_into().unwrap());
            have_id = true;
            start = 8;
        }
        while let Some(header) = pending.get(start..start + HEADER) {
            let len = u32::from_le_bytes(header[..4].try_into().unwrap()) as usize;
            let sequence = u32::from_le_bytes(header[4..].try_into().unwrap());
            if len == 0 || len > max_frame || sequence != received.frames {
                received.error = Some(format!(
                    "client {}: frame {} has a corrupt header (length {len}, sequence \
                     {sequence})",
                    received.client, received.frames
                ));
                break;
            }
            let end = start + HEADER + len + TRAILER;
            let Some(frame) = pending.get(start..end) else {
                break; // the rest is still on its way
            };
            let payload = &frame[HEADER..HEADER + len];
            let expected = u64::from_le_bytes(frame[HEADER + len..].try_into().unwrap());
            if checksum(&frame[..HEADER], payload) != expected {
                received.bad_checksums += 1;
            }
            received.frames += 1;
            start = end;
        }
    }
}

/// Every stream arrived whole: one per client, the bytes and frames each client sent, and no
/// bad checksum.
fn verify(sent: &[Sent], received: &[Received]) -> Vec<String> {
    let mut failures = Vec::new();
    if received.len() != sent.len() {
        failures.push(format!(
            "{} streams arrived for {} clients",
            received.len(),
            sent.len()
        ));
    }
    let mut seen = vec![false; sent.len()];
    for stream in received {
        if let Some(error) = &stream.error {
            failures.push(error.clone());
        }
        let Some(expected) = sent.get(stream.client as usize) else {
            failures.push(format!("a stream names unknown client {}", stream.client));
            continue;
        };
        if std::mem::replace(&mut seen[stream.client as usize], true) {
            failures.push(format!("client {} arrived twice", stream.client));
        }
        if (stream.bytes, stream.frames) != (expected.bytes, expected.frames) {
            failures.push(format!(
                "client {}: {} bytes in {} frames arrived, {} bytes in {} frames were sent",
                stream.client, stream.bytes, stream.frames, expected.bytes, expected.frames
            ));
        }
        if stream.bad_checksums > 0 {
            failures.push(format!(
                "client {}: {} frames with a bad checksum",
                stream.client, stream.bad_checksums
            ));
        }
    }
    failures
}

async fn print_progress(pool: Arc<BufPool>, totals: Arc<Totals>, started: Instant) {
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tick.tick().await;
    let mut last = (0, Instant::now());
    loop {
        tick.tick().await;
        let stats = pool.stats();
        let relayed = totals.relayed_bytes.load(Relaxed);
        let now = Instant::now();
        let rate = mib(relayed - last.0) / (now - last.1).as_secs_f64();
        last = (relayed, now);
        println!(
            "{:5.1} s  {:8.1} MiB relayed  {:6.0} MiB/s  in use {:5} / {} KiB  {:3} waiting",
            started.elapsed().as_secs_f64(),
            mib(relayed),
            rate,
            stats.in_use_bytes >> 10,
            stats.max_memory >> 10,
            stats.waiting,
        );
    }
}

fn mib(bytes: u64) -> f64 {
    bytes as f64 / (1 << 20) as f64
}

fn percentile(sorted: &[Duration], q: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let index = ((sorted.len() - 1) as f64 * q).round() as usize;
    sorted[index]
}
