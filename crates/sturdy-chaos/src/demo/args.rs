//! Command-line parsing (by hand: a handful of flags).

use std::fmt;
use std::path::PathBuf;
use std::time::Duration;

pub(crate) const USAGE: &str = "\
usage:
  sturdy-chaos [--json] [--orders N]
      The same orders against a faulty API with a plain hyper client, a naive retry loop and
      sturdy's ClientBuilder; prints what the server saw (a table, or one JSON object).
      --orders N               orders per client [200]
  sturdy-chaos jitter [--json] [--clients 10,25,...] [--runs N] [--out DIR] [--no-plots]
                      [--seed N] [--base-ms N] [--cap-ms N] [--latency-ms N]
                      [--latency-jitter-ms N]
      N clients each increment one counter under optimistic concurrency (read, then write with
      If-Match; a stale write gets 412 and the client backs off, reads and tries again), with no
      backoff, exponential, full jitter, equal jitter and decorrelated jitter. Prints the calls and
      the completion time per strategy and N, and writes jitter-calls.svg and jitter-time.svg.
      --clients LIST           numbers of contending clients [10,25,50,75,100]
      --runs N                 runs per strategy and N, averaged [2]
      --out DIR                where the plots go [the repository's docs/]
      --no-plots               write no plots
      --seed N                 seed of the clients' and the server's random draws [2015]
      --base-ms N              backoff base [4]
      --cap-ms N               backoff cap [100]
      --latency-ms N           server time per counter request [1]
      --latency-jitter-ms N    a random extra server time per request, up to N [0]
  sturdy-chaos --serve
      Starts the chaos server with the demo's faults and keeps it running.

Results go to stdout, progress to stderr.";

/// What to run.
#[derive(Debug)]
pub(crate) enum Command {
    Help,
    Serve,
    Orders(OrdersArgs),
    Jitter(JitterArgs),
}

/// Options of the orders demo.
#[derive(Debug, Clone)]
pub(crate) struct OrdersArgs {
    pub(crate) json: bool,
    pub(crate) orders: usize,
}

/// Options of the jitter experiment.
#[derive(Debug, Clone)]
pub(crate) struct JitterArgs {
    pub(crate) json: bool,
    pub(crate) clients: Vec<usize>,
    pub(crate) out: Option<PathBuf>,
    pub(crate) seed: u64,
    pub(crate) base: Duration,
    pub(crate) cap: Duration,
    pub(crate) latency: Duration,
    pub(crate) latency_jitter: Duration,
    pub(crate) runs: u32,
}

impl Default for JitterArgs {
    fn default() -> Self {
        Self {
            json: false,
            clients: vec![10, 25, 50, 75, 100],
            out: Some(default_docs_dir()),
            seed: 2015,
            base: Duration::from_millis(4),
            cap: Duration::from_millis(100),
            latency: Duration::from_millis(1),
            latency_jitter: Duration::ZERO,
            runs: 2,
        }
    }
}

/// The repository's `docs/`, wherever the command is run from.
fn default_docs_dir() -> PathBuf {
    PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../../docs"))
}

/// A command line that cannot be run.
#[derive(Debug, PartialEq, Eq)]
pub(crate) struct ArgError(String);

impl fmt::Display for ArgError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for ArgError {}

fn err<T>(msg: impl Into<String>) -> Result<T, ArgError> {
    Err(ArgError(msg.into()))
}

/// The largest number of orders or clients accepted: the demo is meant to run in seconds.
const MAX_COUNT: usize = 100_000;
/// The largest number of contending clients accepted (each holds a connection).
const MAX_CLIENTS: usize = 400;

fn count(flag: &str, v: Option<&String>, max: usize) -> Result<usize, ArgError> {
    let Some(v) = v else {
        return err(format!("{flag} needs a number"));
    };
    match v.parse::<usize>() {
        Ok(n) if (1..=max).contains(&n) => Ok(n),
        _ => err(format!(
            "{flag} takes a whole number from 1 to {max}, not {v:?}"
        )),
    }
}

fn millis(flag: &str, v: Option<&String>, min: u64) -> Result<Duration, ArgError> {
    let Some(v) = v else {
        return err(format!("{flag} needs a number of milliseconds"));
    };
    match v.parse::<u64>() {
        Ok(n) if (min..=60_000).contains(&n) => Ok(Duration::from_millis(n)),
        _ => err(format!(
            "{flag} takes a whole number of milliseconds from {min} to 60000, not {v:?}"
        )),
    }
}

/// Parses the arguments after the program name.
pub(crate) fn parse(args: &[String]) -> Result<Command, ArgError> {
    if args
        .iter()
        .any(|a| a == "--help" || a == "-h" || a == "help")
    {
        return Ok(Command::Help);
    }
    if args.first().map(String::as_str) == Some("jitter") {
        return parse_jitter(&args[1..]).map(Command::Jitter);
    }
    let mut serve = false;
    let mut o = OrdersArgs {
        json: false,
        orders: 200,
    };
    let mut it = args.iter();
    while let Some(a) = it.next() {
        match a.as_str() {
            "--serve" => serve = true,
            "--json" => o.json = true,
            "--orders" => o.orders = count("--orders", it.next(), MAX_COUNT)?,
            other => return err(format!("unknown argument {other:?}")),
        }
    }
    if serve {
        if o.json || args.iter().any(|a| a == "--orders") {
            return err("--serve takes no other option");
        }
        return Ok(Command::Serve);
    }
    Ok(Command::Orders(o))
}

fn parse_jitter(args: &[String]) -> Result<JitterArgs, ArgError> {
    let mut j = JitterArgs::default();
    // `--no-plots` wins wherever it stands, `--out` after it included.
    let mut no_plots = false;
    let mut it = args.iter();
    while let Some(a) = it.next() {
        match a.as_str() {
            "--json" => j.json = true,
            "--no-plots" => no_plots = true,
            "--out" => match it.next() {
                Some(d) => j.out = Some(PathBuf::from(d)),
                None => return err("--out needs a directory"),
            },
            "--clients" => {
                let Some(list) = it.next() else {
                    return err("--clients needs a list such as 10,20,40");
                };
                let mut clients = Vec::new();
                for n in list.split(',') {
                    clients.push(count("--clients", Some(&n.trim().to_owned()), MAX_CLIENTS)?);
                }
                clients.sort_unstable();
                clients.dedup();
                j.clients = clients;
            }
            "--seed" => match it.next().map(|s| s.parse::<u64>()) {
                Some(Ok(s)) => j.seed = s,
                _ => return err("--seed takes a whole number"),
            },
            "--base-ms" => j.base = millis("--base-ms", it.next(), 1)?,
            "--cap-ms" => j.cap = millis("--cap-ms", it.next(), 1)?,
            "--latency-ms" => j.latency = millis("--latency-ms", it.next(), 0)?,
            "--runs" => j.runs = u32::try_from(count("--runs", it.next(), 20)?).unwrap_or(1),
            "--latency-jitter-ms" => {
                j.latency_jitter = millis("--latency-jitter-ms", it.next(), 0)?;
            }
            other => return err(format!("unknown argument to jitter: {other:?}")),
        }
    }
    if j.base > j.cap {
        return err("--base-ms must not exceed --cap-ms");
    }
    if no_plots {
        j.out = None;
    }
    Ok(j)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(s: &str) -> Result<Command, ArgError> {
        let v: Vec<String> = s.split_whitespace().map(str::to_owned).collect();
        parse(&v)
    }

    #[test]
    fn defaults_and_flags() {
        let Ok(Command::Orders(o)) = p("") else {
            panic!()
        };
        assert_eq!((o.json, o.orders), (false, 200));
        let Ok(Command::Orders(o)) = p("--json --orders 40") else {
            panic!()
        };
        assert_eq!((o.json, o.orders), (true, 40));
        assert!(matches!(p("--serve"), Ok(Command::Serve)));
        assert!(matches!(p("jitter --help"), Ok(Command::Help)));
        let Ok(Command::Jitter(j)) = p("jitter --json --clients 20,5,5 --no-plots --cap-ms 50")
        else {
            panic!()
        };
        assert!(j.json && j.out.is_none());
        assert_eq!(j.clients, [5, 20]);
        assert_eq!(j.cap, Duration::from_millis(50));
        for order in [
            "jitter --no-plots --out /tmp/x",
            "jitter --out /tmp/x --no-plots",
        ] {
            let Ok(Command::Jitter(j)) = p(order) else {
                panic!("{order}")
            };
            assert!(j.out.is_none(), "{order}: --no-plots writes no plots");
        }
    }

    #[test]
    fn bad_input_is_an_error_not_a_panic() {
        for bad in [
            "--orders",
            "--orders 0",
            "--orders x",
            "--orders 100001",
            "--frobnicate",
            "--serve --json",
            "jitter --clients",
            "jitter --clients 10,,20",
            "jitter --clients 1000",
            "jitter --base-ms 10 --cap-ms 5",
            "jitter --latency-ms -1",
            "jitter --out",
            "jitter --seed x",
        ] {
            assert!(p(bad).is_err(), "{bad}");
        }
    }
}
