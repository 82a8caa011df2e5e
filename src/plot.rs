//! Figures as PNG and SVG with the same bytes on every machine: drawn by plotters with a font
//! compiled into the binary (`assets/fonts`), from numbers alone. The training curves
//! ([`crate::train::draw_curves`]) and a sweep's plots ([`crate::sweep::plots`]) are drawn here.

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use plotters::coord::Shift;
use plotters::prelude::*;
use plotters::style::FontStyle;

/// The font family every text uses; registered from the bundled font.
pub const FONT: &str = "sans-serif";

/// Errors from drawing a figure.
#[derive(Debug, thiserror::Error)]
pub enum PlotError {
    #[error("{}: cannot draw the figure: {message}", path.display())]
    Draw { path: PathBuf, message: String },
    #[error("{}: {source}", path.display())]
    Io { path: PathBuf, source: std::io::Error },
    #[error("the bundled font does not load")]
    Font,
}

/// Something drawn on any plotters backend.
pub trait Figure {
    /// Size in pixels (the SVG's user units).
    fn size(&self) -> (u32, u32);

    /// Draws on `root` and presents it (which writes a bitmap backend's file).
    fn draw<DB: DrawingBackend>(
        &self,
        root: DrawingArea<DB, Shift>,
    ) -> Result<(), DrawingAreaErrorKind<DB::ErrorType>>;
}

/// Draws `figure` into `png` and `svg`.
pub fn save(figure: &impl Figure, png: &Path, svg: &Path) -> Result<(), PlotError> {
    register_font()?;
    let mut text = String::new();
    let drawn = figure.draw(SVGBackend::with_string(&mut text, figure.size()).into_drawing_area());
    drawn.map_err(|e| PlotError::Draw { path: svg.into(), message: e.to_string() })?;
    std::fs::write(svg, text).map_err(|source| PlotError::Io { path: svg.into(), source })?;
    let drawn = figure.draw(BitMapBackend::new(png, figure.size()).into_drawing_area());
    drawn.map_err(|e| PlotError::Draw { path: png.into(), message: e.to_string() })
}

/// Registers the bundled DejaVu Sans as [`FONT`], once per process.
fn register_font() -> Result<(), PlotError> {
    static REGISTERED: OnceLock<bool> = OnceLock::new();
    let ok = *REGISTERED.get_or_init(|| {
        let bytes: &'static [u8] = include_bytes!("../assets/fonts/DejaVuSans.ttf");
        plotters::style::register_font(FONT, FontStyle::Normal, bytes).is_ok()
    });
    if ok { Ok(()) } else { Err(PlotError::Font) }
}

/// `1`, `0.5`, `0.125`: at most three decimals, no trailing zeros.
pub fn short_number(value: f64) -> String {
    let text = format!("{value:.3}");
    let text = text.trim_end_matches('0').trim_end_matches('.');
    if text == "-0" { "0".into() } else { text.into() }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numbers_are_short() {
        assert_eq!(short_number(1.0), "1");
        assert_eq!(short_number(0.5), "0.5");
        assert_eq!(short_number(0.1234), "0.123");
        assert_eq!(short_number(-0.0001), "0");
    }
}
