//! Line charts drawn as SVG by hand (axes, ticks, a legend): training loss curves and pass@1 per
//! round. No plotting library: the output is a few hundred bytes of text that any browser shows.
use std::fmt::Write as _;

/// Named series of `(x, y)` points.
pub type Series = (String, Vec<(f64, f64)>);

const COLOURS: &[&str] = &["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f"];

/// How the y axis is scaled.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum YAxis {
    /// From the lowest to the highest value.
    Fit,
    /// From 0 to at most 1 (a rate).
    Probability,
}

/// A line chart of named series, with axes, ticks and a legend.
pub fn line_chart(title: &str, x_label: &str, y_label: &str, series: &[Series], y_axis: YAxis) -> String {
    let (w, h, left, right, top, bottom) = (720.0, 420.0, 70.0, 170.0, 40.0, 50.0);
    let points = series.iter().flat_map(|(_, p)| p.iter()).filter(|(x, y)| x.is_finite() && y.is_finite());
    let (mut x0, mut x1, mut y0, mut y1) = (f64::MAX, f64::MIN, f64::MAX, f64::MIN);
    for &(x, y) in points {
        (x0, x1, y0, y1) = (x0.min(x), x1.max(x), y0.min(y), y1.max(y));
    }
    if x0 > x1 {
        (x0, x1, y0, y1) = (0.0, 1.0, 0.0, 1.0);
    }
    if y_axis == YAxis::Probability {
        (y0, y1) = (0.0, (y1 * 1.2).clamp(0.05, 1.0));
    }
    if x1 - x0 < 1e-9 {
        x1 = x0 + 1.0;
    }
    if y1 - y0 < 1e-9 {
        (y0, y1) = (y0 - 0.5, y1 + 0.5);
    }
    let (pw, ph) = (w - left - right, h - top - bottom);
    let sx = |x: f64| left + (x - x0) / (x1 - x0) * pw;
    let sy = |y: f64| top + ph - (y - y0) / (y1 - y0) * ph;
    let mut svg = String::new();
    let _ = writeln!(
        svg,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" font-family="sans-serif" font-size="12">"#
    );
    let _ = writeln!(svg, r#"<rect width="{w}" height="{h}" fill="white"/>"#);
    let _ = writeln!(
        svg,
        r#"<text x="{}" y="22" text-anchor="middle" font-size="15">{}</text>"#,
        left + pw / 2.0,
        escape(title)
    );
    let _ = writeln!(svg, r#"<rect x="{left}" y="{top}" width="{pw}" height="{ph}" fill="none" stroke="black"/>"#);
    // Whole-number x values over a short span (rounds) get a tick each.
    let whole = series.iter().flat_map(|(_, p)| p.iter()).all(|(x, _)| x.fract() == 0.0) && x1 - x0 <= 10.0;
    let x_ticks: Vec<f64> = if whole {
        (x0 as i64..=x1 as i64).map(|x| x as f64).collect()
    } else {
        (0..=4).map(|i| x0 + (x1 - x0) * i as f64 / 4.0).collect()
    };
    for fx in x_ticks {
        let _ = writeln!(
            svg,
            r#"<text x="{:.1}" y="{:.1}" text-anchor="middle">{}</text>"#,
            sx(fx),
            top + ph + 16.0,
            tick(fx)
        );
    }
    for i in 0..=4 {
        let fy = y0 + (y1 - y0) * i as f64 / 4.0;
        let _ = writeln!(
            svg,
            r#"<text x="{:.1}" y="{:.1}" text-anchor="end">{}</text>"#,
            left - 6.0,
            sy(fy) + 4.0,
            tick(fy)
        );
        let _ = writeln!(
            svg,
            r##"<line x1="{left}" x2="{:.1}" y1="{:.1}" y2="{:.1}" stroke="#ddd"/>"##,
            left + pw,
            sy(fy),
            sy(fy)
        );
    }
    let _ = writeln!(
        svg,
        r#"<text x="{:.1}" y="{:.1}" text-anchor="middle">{}</text>"#,
        left + pw / 2.0,
        h - 12.0,
        escape(x_label)
    );
    let _ = writeln!(
        svg,
        r#"<text transform="translate(18,{:.1}) rotate(-90)" text-anchor="middle">{}</text>"#,
        top + ph / 2.0,
        escape(y_label)
    );
    for (i, (name, points)) in series.iter().enumerate() {
        let colour = COLOURS[i % COLOURS.len()];
        let path: Vec<String> = points
            .iter()
            .filter(|(x, y)| x.is_finite() && y.is_finite())
            .map(|&(x, y)| format!("{:.1},{:.1}", sx(x), sy(y)))
            .collect();
        let _ = writeln!(
            svg,
            r#"<polyline fill="none" stroke="{colour}" stroke-width="1.5" points="{}"/>"#,
            path.join(" ")
        );
        if points.len() <= 20 {
            for p in &path {
                let (cx, cy) = p.split_once(',').expect("formatted as x,y");
                let _ = writeln!(svg, r#"<circle cx="{cx}" cy="{cy}" r="3" fill="{colour}"/>"#);
            }
        }
        let ly = top + 10.0 + 18.0 * i as f64;
        let _ = writeln!(
            svg,
            r#"<line x1="{0}" x2="{1}" y1="{ly}" y2="{ly}" stroke="{colour}" stroke-width="3"/>"#,
            w - right + 10.0,
            w - right + 30.0
        );
        let _ = writeln!(svg, r#"<text x="{}" y="{}">{}</text>"#, w - right + 36.0, ly + 4.0, escape(name));
    }
    svg.push_str("</svg>\n");
    svg
}

fn tick(value: f64) -> String {
    if value.abs() >= 100.0 || value.fract().abs() < 1e-9 {
        format!("{value:.0}")
    } else {
        format!("{value:.3}")
    }
}

fn escape(text: &str) -> String {
    text.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;")
}
