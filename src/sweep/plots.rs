//! A sweep's plots, redrawn whenever a trial ends, next to its record (`sweeps/<id>/`):
//!
//! - `history.png`/`.svg`: each trial's objective in trial order (pruned trials hollow, at the
//!   value where they stopped) and the best complete trial so far as a line;
//! - `parallel.png`/`.svg`: parallel coordinates, one axis per parameter (log-scaled for
//!   `log_uniform`) and one for the objective, a line per trial coloured by its objective
//!   (darker is better), pruned trials in grey.
//!
//! Drawn from the record's numbers alone ([`crate::plot`]): the same sweep gives the same bytes.

use std::path::{Path, PathBuf};

use plotters::coord::Shift;
use plotters::prelude::*;

use super::run::{Status, SweepOutcome, Trial};
use super::spec::{Space, SweepSpec};
use crate::plot::{FONT, Figure, PlotError, short_number};

const SIZE: (u32, u32) = (1200, 560);
const COMPLETE: RGBColor = RGBColor(31, 119, 180);
const PRUNED: RGBColor = RGBColor(150, 150, 150);
const BEST: RGBColor = RGBColor(255, 127, 14);

/// Draws both plots of `outcome` into `dir`; returns the PNG paths.
pub fn draw(spec: &SweepSpec, outcome: &SweepOutcome, dir: &Path) -> Result<Vec<PathBuf>, PlotError> {
    std::fs::create_dir_all(dir).map_err(|source| PlotError::Io { path: dir.into(), source })?;
    let metric = &spec.objective.metric;
    let history = History::new(&outcome.trials, metric, spec.objective.maximize);
    let parallel = Parallel::new(spec, &outcome.trials);
    let mut pngs = Vec::new();
    for (name, figure) in [("history", &history as &dyn Save), ("parallel", &parallel)] {
        let (png, svg) = (dir.join(format!("{name}.png")), dir.join(format!("{name}.svg")));
        figure.save(&png, &svg)?;
        pngs.push(png);
    }
    Ok(pngs)
}

/// [`crate::plot::save`] for either figure (`Figure` has a generic method, so no trait objects).
trait Save {
    fn save(&self, png: &Path, svg: &Path) -> Result<(), PlotError>;
}

impl<F: Figure> Save for F {
    fn save(&self, png: &Path, svg: &Path) -> Result<(), PlotError> {
        crate::plot::save(self, png, svg)
    }
}

/// The optimisation history.
struct History {
    metric: String,
    /// (trial number from 1, objective) of complete and of pruned trials.
    complete: Vec<(f64, f64)>,
    pruned: Vec<(f64, f64)>,
    /// The best complete objective after each complete trial.
    best: Vec<(f64, f64)>,
    trials: f64,
}

impl History {
    fn new(trials: &[Trial], metric: &str, maximize: bool) -> Self {
        let point = |t: &Trial| Some((t.number as f64 + 1.0, t.objective.filter(|y| y.is_finite())?));
        let complete: Vec<(f64, f64)> =
            trials.iter().filter(|t| t.status == Status::Complete).filter_map(point).collect();
        let pruned =
            trials.iter().filter(|t| matches!(t.status, Status::Pruned { .. })).filter_map(point).collect();
        let mut best: Vec<(f64, f64)> = Vec::new();
        for &(x, y) in &complete {
            let so_far = best.last().map_or(y, |&(_, b)| if maximize { b.max(y) } else { b.min(y) });
            best.push((x, so_far));
        }
        let trials = trials.iter().map(|t| t.number + 1).max().unwrap_or(1) as f64;
        Self { metric: metric.to_string(), complete, pruned, best, trials }
    }
}

impl Figure for History {
    fn size(&self) -> (u32, u32) {
        SIZE
    }

    fn draw<DB: DrawingBackend>(
        &self,
        root: DrawingArea<DB, Shift>,
    ) -> Result<(), DrawingAreaErrorKind<DB::ErrorType>> {
        root.fill(&WHITE)?;
        let values = self.complete.iter().chain(&self.pruned).map(|&(_, y)| y);
        let (low, high) = values.fold((f64::INFINITY, f64::NEG_INFINITY), |(l, h), y| (l.min(y), h.max(y)));
        let (low, high) = if low.is_finite() { (low, high) } else { (0.0, 1.0) };
        let pad = if high > low { (high - low) * 0.1 } else { 0.5 };
        let mut chart = ChartBuilder::on(&root)
            .caption(format!("Optimisation history: {}", self.metric), (FONT, 22))
            .margin(16)
            .x_label_area_size(48)
            .y_label_area_size(72)
            // Headroom at the top keeps the legend off the points.
            .build_cartesian_2d(0.5..self.trials + 0.5, low - pad..high + 4.0 * pad)?;
        chart
            .configure_mesh()
            .x_desc("trial")
            .y_desc(self.metric.as_str())
            // Trials are whole numbers: ticks between them stay unlabelled.
            .x_labels((self.trials as usize + 1).min(21))
            .x_label_formatter(&|x| if x.fract() == 0.0 { short_number(*x) } else { String::new() })
            .y_label_formatter(&|y| short_number(*y))
            .label_style((FONT, 14))
            .axis_desc_style((FONT, 16))
            .light_line_style(WHITE.mix(0.0))
            .draw()?;
        chart
            .draw_series(LineSeries::new(self.best.iter().copied(), BEST.stroke_width(2)))?
            .label("best so far")
            .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], BEST.stroke_width(2)));
        chart
            .draw_series(self.complete.iter().map(|&p| Circle::new(p, 5, COMPLETE.filled())))?
            .label("complete")
            .legend(|(x, y)| Circle::new((x + 10, y), 5, COMPLETE.filled()));
        if !self.pruned.is_empty() {
            chart
                .draw_series(self.pruned.iter().map(|&p| Circle::new(p, 5, PRUNED.stroke_width(2))))?
                .label("pruned (where it stopped)")
                .legend(|(x, y)| Circle::new((x + 10, y), 5, PRUNED.stroke_width(2)));
        }
        chart
            .configure_series_labels()
            .position(SeriesLabelPosition::UpperRight)
            .background_style(WHITE.mix(0.85))
            .border_style(BLACK.mix(0.3))
            .label_font((FONT, 14))
            .draw()?;
        root.present()
    }
}

/// One axis of the parallel coordinates: its name, the labels at its ends, and each trial's
/// position on it in [0, 1] (`None`: the trial has no value there).
struct Axis {
    name: String,
    ends: (String, String),
    positions: Vec<Option<f64>>,
}

/// Parallel coordinates over the trials that have an objective.
struct Parallel {
    axes: Vec<Axis>,
    /// Per trial: pruned, and its objective's position in [0, 1] where 1 is best.
    trials: Vec<(bool, f64)>,
}

impl Parallel {
    fn new(spec: &SweepSpec, trials: &[Trial]) -> Self {
        let trials: Vec<&Trial> = trials.iter().filter(|t| t.objective.is_some_and(f64::is_finite)).collect();
        let mut axes: Vec<Axis> = spec
            .params
            .iter()
            .map(|p| {
                let value = |t: &Trial| {
                    let prefix = format!("{}=", p.key);
                    t.overrides.iter().find_map(|o| o.strip_prefix(&prefix).map(str::to_owned))
                };
                let ends = ends(&p.space);
                let position = |text: &str| position(&p.space, text);
                let positions = trials.iter().map(|t| value(t).as_deref().and_then(&position)).collect();
                Axis { name: p.key.clone(), ends, positions }
            })
            .collect();
        let ys: Vec<f64> = trials.iter().map(|t| t.objective.unwrap()).collect();
        let (low, high) =
            ys.iter().fold((f64::INFINITY, f64::NEG_INFINITY), |(l, h), &y| (l.min(y), h.max(y)));
        let span = if high > low { high - low } else { 1.0 };
        let objective: Vec<Option<f64>> = ys.iter().map(|y| Some((y - low) / span)).collect();
        let goodness = |p: f64| if spec.objective.maximize { p } else { 1.0 - p };
        let scored = trials
            .iter()
            .zip(&objective)
            .map(|(t, p)| (matches!(t.status, Status::Pruned { .. }), goodness(p.unwrap_or(0.0))))
            .collect();
        let ends = if low.is_finite() {
            (short_number(low), short_number(high))
        } else {
            (String::new(), String::new())
        };
        axes.push(Axis { name: spec.objective.metric.clone(), ends, positions: objective });
        Self { axes, trials: scored }
    }
}

impl Figure for Parallel {
    fn size(&self) -> (u32, u32) {
        SIZE
    }

    fn draw<DB: DrawingBackend>(
        &self,
        root: DrawingArea<DB, Shift>,
    ) -> Result<(), DrawingAreaErrorKind<DB::ErrorType>> {
        root.fill(&WHITE)?;
        let last = (self.axes.len() - 1) as f64;
        let mut chart = ChartBuilder::on(&root)
            .caption("Parallel coordinates (darker: better objective)", (FONT, 22))
            .margin(48)
            .margin_bottom(64)
            .build_cartesian_2d(-0.1..last + 0.1, -0.08..1.08)?;
        // Worst first, so the best lines are drawn on top; pruned trials under all.
        let mut order: Vec<usize> = (0..self.trials.len()).collect();
        order.sort_by(|&a, &b| {
            let key = |i: usize| (!self.trials[i].0, self.trials[i].1);
            key(a).partial_cmp(&key(b)).unwrap_or(std::cmp::Ordering::Equal)
        });
        for i in order {
            let (pruned, good) = self.trials[i];
            let points: Vec<(f64, f64)> = self
                .axes
                .iter()
                .enumerate()
                .filter_map(|(a, axis)| Some((a as f64, axis.positions[i]?)))
                .collect();
            let color = if pruned { PRUNED.mix(0.6) } else { shade(good).mix(0.9) };
            chart.draw_series(std::iter::once(PathElement::new(points, color.stroke_width(2))))?;
        }
        let text = |size| (FONT, size).into_font().color(&BLACK);
        for (a, axis) in self.axes.iter().enumerate() {
            let x = a as f64;
            chart.draw_series(std::iter::once(PathElement::new(
                vec![(x, 0.0), (x, 1.0)],
                BLACK.stroke_width(1),
            )))?;
            chart.draw_series([
                Text::new(axis.ends.1.clone(), (x, 1.06), text(13)),
                Text::new(axis.ends.0.clone(), (x, -0.02), text(13)),
                Text::new(axis.name.clone(), (x, -0.06), text(15)),
            ])?;
        }
        root.present()
    }
}

/// The labels at an axis's low and high ends.
fn ends(space: &Space) -> (String, String) {
    match space {
        Space::Uniform { low, high } => (short_number(*low), short_number(*high)),
        Space::Int { low, high } => (low.to_string(), high.to_string()),
        Space::LogUniform { low, high } => (format!("{low:e}"), format!("{high:e} (log)")),
        Space::Choice(options) | Space::Grid(options) => {
            (options[0].to_string(), options[options.len() - 1].to_string())
        }
    }
}

/// Where a value (as its `--set` text) sits on its space's axis, in [0, 1].
fn position(space: &Space, text: &str) -> Option<f64> {
    let number = || text.parse::<f64>().ok();
    match space {
        Space::Uniform { low, high } => Some((number()? - low) / (high - low)),
        Space::Int { low, high } => Some((number()? - *low as f64) / (*high - *low) as f64),
        Space::LogUniform { low, high } => {
            Some((libm::log(number()?) - libm::log(*low)) / (libm::log(*high) - libm::log(*low)))
        }
        Space::Choice(options) | Space::Grid(options) => {
            let index = options.iter().position(|o| o.to_string() == text)?;
            Some(index as f64 / (options.len() - 1).max(1) as f64)
        }
    }
}

/// Light blue (worst) to dark blue (best).
fn shade(good: f64) -> RGBColor {
    let mix = |light: u8, dark: u8| {
        (light as f64 + (dark as f64 - light as f64) * good.clamp(0.0, 1.0)).round() as u8
    };
    RGBColor(mix(198, 8), mix(219, 48), mix(239, 107))
}
