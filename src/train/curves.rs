//! Training curves: the evaluations of a run drawn as `curves.png` and `curves.svg`.
//!
//! Two panels over the epochs: the train and validation loss, and a validation metric; with early
//! stopping, the best evaluation is marked. The drawing is made from the evaluations alone
//! ([`crate::plot`]), so the same numbers give the same bytes on any machine: the files are stage
//! outputs, part of the train stage's digest.

use std::path::Path;

use plotters::coord::Shift;
use plotters::prelude::*;

use super::Evaluation;
use crate::config::Metric;
use crate::plot::{FONT, Figure, PlotError, short_number};

/// Size of the drawing in pixels (the SVG's user units).
const SIZE: (u32, u32) = (1200, 480);

const TRAIN_COLOR: RGBColor = RGBColor(31, 119, 180);
const VALIDATION_COLOR: RGBColor = RGBColor(255, 127, 14);
const METRIC_COLOR: RGBColor = RGBColor(44, 160, 44);
const BEST_COLOR: RGBColor = RGBColor(120, 120, 120);

/// Draws `evaluations` into `png` and `svg`: the losses, and `metric` (a validation metric other
/// than the loss) when given; `best` (an index into `evaluations`) is marked.
pub fn draw_curves(
    evaluations: &[Evaluation],
    metric: Option<Metric>,
    best: Option<usize>,
    png: &Path,
    svg: &Path,
) -> Result<(), PlotError> {
    crate::plot::save(&Curves::new(evaluations, metric.filter(|&m| m != Metric::Loss), best), png, svg)
}

/// The series to draw, as (epoch, value) points with non-finite values left out.
struct Curves {
    train_loss: Vec<(f64, f64)>,
    validation_loss: Vec<(f64, f64)>,
    metric: Option<(Metric, Vec<(f64, f64)>)>,
    best_epoch: Option<f64>,
    /// The best evaluation's validation loss and metric, shown with the best mark.
    best_loss: Option<f64>,
    best_metric: Option<f64>,
    epochs: std::ops::Range<f64>,
}

impl Curves {
    fn new(evaluations: &[Evaluation], metric: Option<Metric>, best: Option<usize>) -> Self {
        let points = |value: &dyn Fn(&Evaluation) -> Option<f64>| -> Vec<(f64, f64)> {
            evaluations
                .iter()
                .filter_map(|e| Some((e.epoch, value(e)?)))
                .filter(|(_, v)| v.is_finite())
                .collect()
        };
        let best_evaluation = best.and_then(|i| evaluations.get(i));
        let first = evaluations.first().map_or(0.0, |e| e.epoch);
        let last = evaluations.last().map_or(1.0, |e| e.epoch);
        // A margin on both sides keeps the first and last points off the frame.
        let margin = if last > first { (last - first) * 0.04 } else { 0.5 };
        Self {
            train_loss: points(&|e| Some(e.train_loss)),
            validation_loss: points(&|e| Some(e.validation_loss)),
            metric: metric.map(|m| (m, points(&|e| e.value(m)))),
            best_epoch: best_evaluation.map(|e| e.epoch),
            best_loss: best_evaluation.map(|e| e.validation_loss),
            best_metric: best_evaluation.zip(metric).and_then(|(e, m)| e.value(m)),
            epochs: (first - margin).max(0.0)..last + margin,
        }
    }
}

impl Figure for Curves {
    fn size(&self) -> (u32, u32) {
        SIZE
    }

    /// Both panels: the losses, and the metric when there is one.
    fn draw<DB: DrawingBackend>(
        &self,
        root: DrawingArea<DB, Shift>,
    ) -> Result<(), DrawingAreaErrorKind<DB::ErrorType>> {
        let curves = self;
        root.fill(&WHITE)?;
        let panels = match curves.metric {
            Some(_) => root.split_evenly((1, 2)),
            None => vec![root.clone()],
        };
        let loss_max =
            curves.train_loss.iter().chain(&curves.validation_loss).map(|&(_, v)| v).fold(0.0f64, f64::max);
        // Headroom above the highest loss for the legend, which sits in the upper right corner where
        // falling losses leave room; rising metrics leave room in the lower right corner.
        let loss_top = if loss_max > 0.0 { loss_max * 1.3 } else { 1.0 };
        let series = [
            Series { name: "train loss", color: TRAIN_COLOR, points: &curves.train_loss },
            Series { name: "validation loss", color: VALIDATION_COLOR, points: &curves.validation_loss },
        ];
        let loss = Panel { caption: "Loss", y_label: "loss", y_range: 0.0..loss_top, series: &series };
        draw_panel(&panels[0], &loss, SeriesLabelPosition::UpperRight, curves.best_loss, curves)?;
        if let Some((metric, points)) = &curves.metric {
            let name = format!("validation {metric}");
            let series = [Series { name: &name, color: METRIC_COLOR, points }];
            let caption = format!("Validation {metric}");
            let panel =
                Panel { caption: &caption, y_label: metric.name(), y_range: 0.0..1.0, series: &series };
            draw_panel(&panels[1], &panel, SeriesLabelPosition::LowerRight, curves.best_metric, curves)?;
        }
        root.present()
    }
}

/// One line of a chart.
struct Series<'a> {
    name: &'a str,
    color: RGBColor,
    points: &'a [(f64, f64)],
}

/// One chart's contents.
struct Panel<'a> {
    caption: &'a str,
    y_label: &'a str,
    y_range: std::ops::Range<f64>,
    series: &'a [Series<'a>],
}

/// One chart: each series as a line with a dot per evaluation and its last value in the legend,
/// axes, and the best evaluation (with `best_value` in this panel, if any) as a vertical line.
fn draw_panel<DB: DrawingBackend>(
    area: &DrawingArea<DB, Shift>,
    panel: &Panel,
    legend: SeriesLabelPosition,
    best_value: Option<f64>,
    curves: &Curves,
) -> Result<(), DrawingAreaErrorKind<DB::ErrorType>> {
    let y_range = panel.y_range.clone();
    let mut chart = ChartBuilder::on(area)
        .caption(panel.caption, (FONT, 22))
        .margin(16)
        .x_label_area_size(48)
        .y_label_area_size(64)
        .build_cartesian_2d(curves.epochs.clone(), y_range.clone())?;
    chart
        .configure_mesh()
        .x_desc("epoch")
        .y_desc(panel.y_label)
        .x_label_formatter(&|x| short_number(*x))
        .y_label_formatter(&|y| short_number(*y))
        .label_style((FONT, 14))
        .axis_desc_style((FONT, 16))
        .light_line_style(WHITE.mix(0.0))
        .draw()?;
    for series in panel.series {
        let color = series.color;
        let label = match series.points.last() {
            Some(&(_, last)) => format!("{} (last {})", series.name, short_number(last)),
            None => series.name.to_string(),
        };
        chart
            .draw_series(LineSeries::new(series.points.iter().copied(), color.stroke_width(2)))?
            .label(label)
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(2)));
        chart.draw_series(series.points.iter().map(|&p| Circle::new(p, 3, color.filled())))?;
    }
    if let Some(epoch) = curves.best_epoch {
        let line = vec![(epoch, y_range.start), (epoch, y_range.end)];
        let label = match best_value {
            Some(value) => {
                format!("best: epoch {} ({} {})", short_number(epoch), panel.y_label, short_number(value))
            }
            None => format!("best: epoch {}", short_number(epoch)),
        };
        chart
            .draw_series(std::iter::once(PathElement::new(line, BEST_COLOR.stroke_width(1))))?
            .label(label)
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], BEST_COLOR.stroke_width(1)));
    }
    chart
        .configure_series_labels()
        .position(legend)
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK.mix(0.3))
        .label_font((FONT, 14))
        .draw()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn evaluations() -> Vec<Evaluation> {
        (1..=4)
            .map(|epoch| Evaluation {
                step: epoch * 6,
                epoch: epoch as f64,
                train_loss: 0.7 / epoch as f64,
                validation_loss: 0.5 + 0.02 * epoch as f64,
                metrics: vec![(Metric::Accuracy, 0.5 + 0.1 * epoch as f64)],
            })
            .collect()
    }

    #[test]
    fn the_same_numbers_give_the_same_files() {
        let dir = tempfile::tempdir().unwrap();
        let draw_into = |name: &str| {
            let (png, svg) = (dir.path().join(format!("{name}.png")), dir.path().join(format!("{name}.svg")));
            draw_curves(&evaluations(), Some(Metric::Accuracy), Some(1), &png, &svg).unwrap();
            (std::fs::read(png).unwrap(), std::fs::read_to_string(svg).unwrap())
        };
        let (png, svg) = draw_into("a");
        assert_eq!((png.clone(), svg.clone()), draw_into("b"));
        assert!(png.starts_with(b"\x89PNG"), "not a PNG");
        for text in [
            "train loss (last 0.175)",
            "validation loss (last 0.58)",
            "validation accuracy (last 0.9)",
            "best: epoch 2 (loss 0.54)",
            "best: epoch 2 (accuracy 0.7)",
            "epoch",
        ] {
            assert!(svg.contains(text), "the SVG has no `{text}`");
        }
    }

    #[test]
    fn loss_only_and_single_evaluation_draw() {
        let dir = tempfile::tempdir().unwrap();
        let (png, svg) = (dir.path().join("c.png"), dir.path().join("c.svg"));
        draw_curves(&evaluations()[..1], Some(Metric::Loss), None, &png, &svg).unwrap();
        let svg = std::fs::read_to_string(svg).unwrap();
        assert!(svg.contains("validation loss") && !svg.contains("best"), "{svg}");
    }
}
