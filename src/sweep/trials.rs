//! Which values trial `k` of a sweep tries: a function of the sweep's identity, `k` and the trials
//! it is shown, never of timing or of how many trials were asked for.
//!
//! A sweep's id hashes what its trial list depends on: the pipeline as loaded, the method, the
//! search seed, the objective and the spaces; not `n_trials`, `timeout` or `parallel`, so raising
//! `n_trials` keeps the first trials and their runs. Trial `k` draws from the stream
//! `(id, "sweep", k)`. A proposal equal to an earlier trial's is drawn again from
//! `(id, "sweep-redraw-<k>", attempt)`, a few times; a space too small to avoid it keeps the
//! repeat, whose run is then a cache hit.

use serde_json::json;

use super::sampler::{Observation, Tpe, Value, grid, random};
use super::spec::{Method, Space, SweepSpec};

/// Redraws of a duplicate proposal before it is kept.
const REDRAWS: u64 = 16;

/// The sweep's identity (64 hex digits).
pub fn sweep_id(spec: &SweepSpec) -> String {
    let params: Vec<serde_json::Value> = spec
        .params
        .iter()
        .map(|p| {
            let space = match &p.space {
                Space::Uniform { low, high } => json!({ "uniform": [low, high] }),
                Space::LogUniform { low, high } => json!({ "log_uniform": [low, high] }),
                Space::Int { low, high } => json!({ "int": [low, high] }),
                Space::Choice(v) => {
                    json!({ "choice": v.iter().map(toml::Value::to_string).collect::<Vec<_>>() })
                }
                Space::Grid(v) => json!({ "grid": v.iter().map(toml::Value::to_string).collect::<Vec<_>>() }),
            };
            json!({ "key": p.key, "space": space })
        })
        .collect();
    let identity = json!({
        "pipeline": spec.base.to_toml(),
        "method": spec.method.name(),
        "seed": spec.seed,
        "objective": { "metric": spec.objective.metric, "maximize": spec.objective.maximize },
        "params": params,
    });
    crate::digest::bytes(crate::digest::canonical_json(&identity).as_bytes())
}

/// The seed of a sweep's streams, from its id.
fn stream_seed(id: &str) -> u64 {
    u64::from_str_radix(&id[..16], 16).expect("an id is hex")
}

/// Trial `k`'s values, given the trials before it (`history[i]` is trial `i`; those not yet
/// finished have no objective). `None` when a grid is exhausted.
pub fn propose(spec: &SweepSpec, id: &str, k: u64, history: &[Observation]) -> Option<Vec<Value>> {
    let domains = spec.domains();
    let seed = stream_seed(id);
    let draw = |rng: &mut crate::rng::Rng| match spec.method {
        Method::Random | Method::Grid => random(&domains, rng),
        Method::Tpe => Tpe::default().suggest(&domains, history, rng),
    };
    if spec.method == Method::Grid {
        let options: Vec<Vec<Value>> = domains
            .iter()
            .map(|d| match d {
                super::sampler::Domain::Choice { n } => (0..*n).map(Value::Choice).collect(),
                _ => unreachable!("grid sweeps have list spaces only (checked when loaded)"),
            })
            .collect();
        return grid(&options).into_iter().nth(k as usize);
    }
    let mut values = draw(&mut crate::rng::stream(seed, "sweep", k));
    let seen = |v: &[Value]| history.iter().any(|o| o.values == v);
    for attempt in 0..REDRAWS {
        if !seen(&values) {
            break;
        }
        values = draw(&mut crate::rng::stream(seed, &format!("sweep-redraw-{k}"), attempt));
    }
    Some(values)
}

/// The trials a sweep will propose, as far as they are known before it runs: every trial of a
/// grid or a random search, and TPE's random start-up trials; `None` for a trial that TPE will
/// choose from the results before it. Ends early where a grid is exhausted.
pub fn plan(spec: &SweepSpec) -> Vec<Option<Vec<Value>>> {
    let id = sweep_id(spec);
    let startup = if spec.method == Method::Tpe { Tpe::default().startup as u64 } else { u64::MAX };
    let mut history: Vec<Observation> = Vec::new();
    let mut trials = Vec::new();
    for k in 0..spec.n_trials {
        if k >= startup {
            trials.push(None);
            continue;
        }
        // Results are not read before `startup`: proposing without them gives the same values.
        let Some(values) = propose(spec, &id, k, &history) else { break };
        history.push(Observation { values: values.clone(), objective: None });
        trials.push(Some(values));
    }
    trials
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(method: &str, params: &str, n_trials: u64) -> SweepSpec {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(
            dir.path().join("p.toml"),
            "[dataset]\ntrain = \"t.csv\"\nvalidation = \"v.csv\"\n[model]\nsource = \"m\"\n",
        )
        .unwrap();
        let path = dir.path().join("s.toml");
        let text = format!(
            "pipeline = \"p.toml\"\nmethod = \"{method}\"\nn_trials = {n_trials}\n[params]\n{params}"
        );
        std::fs::write(&path, text).unwrap();
        SweepSpec::load_with_env(&path, &[], &[]).unwrap()
    }

    /// Trials of a sweep whose objective is `f(values)`, proposed one after another.
    fn run(spec: &SweepSpec, f: impl Fn(&[Value]) -> f64) -> Vec<Vec<Value>> {
        let id = sweep_id(spec);
        let mut history = Vec::new();
        for k in 0..spec.n_trials {
            let Some(values) = propose(spec, &id, k, &history) else { break };
            let objective = Some(f(&values));
            history.push(Observation { values, objective });
        }
        history.into_iter().map(|o| o.values).collect()
    }

    fn lr(values: &[Value]) -> f64 {
        let Value::Float(x) = values[0] else { panic!("{values:?}") };
        (libm::log10(x) + 4.0).abs()
    }

    #[test]
    fn the_trial_list_depends_on_the_sweep_not_on_n_trials() {
        const LR: &str = "\"optimizer.lr\" = { log_uniform = [1e-5, 1e-3] }\n";
        let four = run(&spec("tpe", LR, 4), lr);
        assert_eq!(four, run(&spec("tpe", LR, 4), lr), "the same sweep, the same trials");
        let fourteen = run(&spec("tpe", LR, 14), lr);
        assert_eq!(fourteen[..4], four[..], "raising n_trials keeps the first trials");
        assert_eq!(sweep_id(&spec("tpe", LR, 4)), sweep_id(&spec("tpe", LR, 14)));
        assert_ne!(sweep_id(&spec("tpe", LR, 4)), sweep_id(&spec("random", LR, 4)));
        assert_ne!(run(&spec("random", LR, 4), lr), four, "another method, other trials");
    }

    #[test]
    fn the_plan_is_what_the_sweep_proposes_before_reading_results() {
        const LR: &str = "\"optimizer.lr\" = { log_uniform = [1e-5, 1e-3] }\n";
        for method in ["random", "tpe"] {
            let s = spec(method, LR, 12);
            let planned = plan(&s);
            let ran = run(&s, lr);
            assert_eq!(planned.len(), 12);
            let known = if method == "tpe" { 10 } else { 12 };
            for k in 0..12 {
                assert_eq!(planned[k].as_ref(), (k < known).then(|| &ran[k]), "{method} trial {k}");
            }
        }
        let grid = spec("grid", "\"train.epochs\" = { grid = [1, 2] }\n", 5);
        assert_eq!(plan(&grid).len(), 2, "a grid's plan ends with the grid");
    }

    #[test]
    fn duplicates_are_drawn_again_while_the_space_allows() {
        let choice = "\"train.batch_size\" = { choice = [8, 16, 32] }\n";
        let trials = run(&spec("random", choice, 3), |_| 0.0);
        assert_eq!(trials.len(), 3);
        assert!(trials[0] != trials[1] && trials[1] != trials[2] && trials[0] != trials[2], "{trials:?}");
        // A fourth trial in a space of three must repeat one: its run is a cache hit.
        assert_eq!(run(&spec("random", choice, 4), |_| 0.0).len(), 4);
    }

    #[test]
    fn a_grid_is_walked_in_file_order_and_ends() {
        let params = "\"train.epochs\" = { grid = [1, 2] }\n\"train.batch_size\" = { choice = [8, 16] }\n";
        let s = spec("grid", params, 10);
        let trials = run(&s, |_| 0.0);
        assert_eq!(trials.len(), 4);
        assert_eq!(s.overrides(&trials[1]), ["train.epochs=1", "train.batch_size=16"]);
        assert_eq!(s.overrides(&trials[2]), ["train.epochs=2", "train.batch_size=8"]);
    }
}
