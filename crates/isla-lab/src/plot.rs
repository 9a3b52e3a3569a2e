//! SVG plots of the results (plotters, SVG backend only: text stays `<text>` elements, so no
//! font or bitmap libraries are needed). Every plot is drawn, measured or not, and its `<svg>`
//! carries an id (`plot-...`) the report test looks for.

use plotters::prelude::*;

use crate::model::{key, Figure, Kind, Results};
use crate::stats::Summary;
use crate::{Error, Result};

/// One plot: its id, title and SVG text.
pub struct Plot {
    pub id: &'static str,
    pub title: String,
    pub svg: String,
}

/// A bar: label and the summary, or why there is none.
pub type Bar = (String, Result2);
type Result2 = std::result::Result<Summary, String>;

fn bar(label: &str, f: Option<&Figure>) -> Bar {
    let s = match f {
        Some(f) => f.summary().copied().ok_or_else(|| f.brief()),
        None => Err("not run".into()),
    };
    (label.to_string(), s)
}

fn err(e: impl std::fmt::Display) -> Error {
    Error::Render("plot", e.to_string())
}

/// A bar chart: the median as the bar, min to max as a whisker.
pub fn bar_chart(id: &'static str, title: &str, unit: &str, bars: &[Bar]) -> Result<Plot> {
    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, (760, 340)).into_drawing_area();
        root.fill(&WHITE).map_err(err)?;
        let max = bars.iter().filter_map(|(_, s)| s.as_ref().ok().map(|s| s.max)).fold(0.0, f64::max);
        let ymax = if max > 0.0 { max * 1.15 } else { 1.0 };
        let n = bars.len().max(1);
        let mut chart = ChartBuilder::on(&root)
            .caption(title, ("sans-serif", 18))
            .margin(12)
            .x_label_area_size(36)
            .y_label_area_size(80)
            .build_cartesian_2d((0..n).into_segmented(), 0f64..ymax)
            .map_err(err)?;
        let label = |v: &SegmentValue<usize>| match v {
            SegmentValue::CenterOf(i) => bars.get(*i).map(|b| b.0.clone()).unwrap_or_default(),
            _ => String::new(),
        };
        chart
            .configure_mesh()
            .disable_x_mesh()
            .x_labels(n)
            .x_label_formatter(&label)
            .y_desc(unit)
            .draw()
            .map_err(err)?;
        for (i, (_, s)) in bars.iter().enumerate() {
            match s {
                Ok(s) => {
                    let mut r = Rectangle::new(
                        [(SegmentValue::Exact(i), 0.0), (SegmentValue::Exact(i + 1), s.median)],
                        Palette99::pick(i).mix(0.75).filled(),
                    );
                    r.set_margin(0, 0, 18, 18);
                    chart.draw_series(std::iter::once(r)).map_err(err)?;
                    let c = SegmentValue::CenterOf(i);
                    let whisker = PathElement::new(vec![(c.clone(), s.min), (c.clone(), s.max)], BLACK.stroke_width(2));
                    chart.draw_series(std::iter::once(whisker)).map_err(err)?;
                    let text = crate::model::num(s.median);
                    chart
                        .draw_series(std::iter::once(Text::new(text, (c, s.max.max(s.median)), ("sans-serif", 13))))
                        .map_err(err)?;
                }
                Err(reason) => {
                    let text: String = reason.chars().take(40).collect();
                    let at: (SegmentValue<usize>, f64) = (SegmentValue::Exact(i), ymax * 0.05);
                    chart.draw_series(std::iter::once(Text::new(text, at, ("sans-serif", 11)))).map_err(err)?;
                }
            }
        }
        root.present().map_err(err)?;
    }
    Ok(Plot { id, title: title.to_string(), svg: svg.replacen("<svg ", &format!("<svg id=\"{id}\" "), 1) })
}

/// Every subject's figure under `key` (isla's kinds and the peers).
fn subjects(r: &Results, k: &str) -> Vec<Bar> {
    r.subjects.iter().map(|s| bar(&s.name, s.figure(k))).collect()
}

/// The host baseline, then isla's kinds.
fn against_host(r: &Results, k: &str) -> Vec<Bar> {
    let mut v = vec![bar("host", r.baseline(k))];
    for kind in Kind::ALL {
        if let Some(s) = r.isla(kind) {
            v.push(bar(kind.title(), s.figure(k)));
        }
    }
    v
}

/// All the report's plots.
pub fn all(r: &Results) -> Result<Vec<Plot>> {
    let mut disk = Vec::new();
    for (k, what) in [(key::DISK_SEQ_READ, "seq read"), (key::DISK_SEQ_WRITE, "seq write")] {
        for (label, s) in against_host(r, k) {
            disk.push((format!("{label} {what}"), s));
        }
    }
    let mut latency = Vec::new();
    for (k, p) in [(key::HTTP_P50, "p50"), (key::HTTP_P90, "p90"), (key::HTTP_P99, "p99")] {
        for (label, s) in against_host(r, k) {
            latency.push((format!("{label} {p}"), s));
        }
    }
    Ok(vec![
        bar_chart("plot-start", "Start time (command to workload ready)", "ms", &subjects(r, key::START))?,
        bar_chart("plot-memory", "Base memory of one idle instance (Pss)", "KiB", &subjects(r, key::MEMORY))?,
        bar_chart(
            "plot-density",
            "Density: instances per memory budget (projected)",
            "instances",
            &subjects(r, key::DENSITY_PROJECTED),
        )?,
        bar_chart("plot-cpu", "CPU: sysbench prime, events/s", "events/s", &against_host(r, key::CPU))?,
        bar_chart("plot-disk", "Disk: fio sequential, KiB/s", "KiB/s", &disk)?,
        bar_chart("plot-disk-random", "Disk: fio random read 4k, IOPS", "IOPS", &against_host(r, key::DISK_RAND_READ))?,
        bar_chart("plot-net", "Network: iperf3, Mbit/s", "Mbit/s", &against_host(r, key::NET))?,
        bar_chart("plot-http-rps", "Web service: requests per second", "req/s", &against_host(r, key::HTTP_RPS))?,
        bar_chart("plot-http-latency", "Web service: latency percentiles", "ms", &latency)?,
    ])
}

/// The ids `all` draws, in order (the report test checks each).
pub const IDS: [&str; 9] = [
    "plot-start",
    "plot-memory",
    "plot-density",
    "plot-cpu",
    "plot-disk",
    "plot-disk-random",
    "plot-net",
    "plot-http-rps",
    "plot-http-latency",
];

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn draws_bars_and_reasons() {
        let s = Summary::of(&[10.0, 12.0, 30.0]).unwrap();
        let p = bar_chart(
            "plot-x",
            "A title",
            "ms",
            &[("one".into(), Ok(s)), ("two".into(), Err("failed: no kvm".into()))],
        )
        .unwrap();
        assert!(p.svg.starts_with("<svg id=\"plot-x\" "), "{}", &p.svg[..80]);
        assert!(p.svg.contains("A title") && p.svg.contains("one") && p.svg.contains("failed: no kvm"));
        assert!(p.svg.contains("<rect"), "a bar is drawn");
        let empty = bar_chart("plot-y", "Nothing", "ms", &[]).unwrap();
        assert!(empty.svg.contains("id=\"plot-y\""));
    }
}
