//! Tile addressing, sans-IO: parsing `/tiles/...` paths, filling URL
//! templates, TileJSON, and bounding box → tile ranges for seeding.

use crate::config::{TileFormat, TileSource};

/// Deepest zoom level accepted anywhere (2^24 tiles a side is ~2 m/pixel
/// beyond any real source).
pub const MAX_ZOOM: u8 = 24;

/// A tile address.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct TileId {
    /// Zoom.
    pub z: u8,
    /// Column, 0 at the antimeridian west.
    pub x: u32,
    /// Row, 0 at the north (XYZ scheme).
    pub y: u32,
}

/// What a `/tiles/...` path asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TileRequest {
    /// `/tiles/{source}/{z}/{x}/{y}.{ext}`.
    Tile {
        /// Source name.
        source: String,
        /// The tile.
        tile: TileId,
        /// The extension given.
        ext: String,
    },
    /// `/tiles/{source}.json`.
    TileJson {
        /// Source name.
        source: String,
    },
}

/// Why a tile path was rejected (all 400 except `UnknownSource`: 404).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum TilePathError {
    /// Not `/tiles/{source}/{z}/{x}/{y}.{ext}` or `/tiles/{source}.json`.
    #[error("malformed tile path; expected /tiles/{{source}}/{{z}}/{{x}}/{{y}}.{{ext}}")]
    Malformed,
    /// z, x or y is not a plain decimal number.
    #[error("tile coordinates must be decimal integers")]
    BadNumber,
    /// x or y ≥ 2^z, or z beyond the source's zoom range.
    #[error("tile {z}/{x}/{y} is out of range (zoom {min}-{max}, x and y below 2^z)")]
    OutOfRange {
        /// z.
        z: u32,
        /// x.
        x: u64,
        /// y.
        y: u64,
        /// Source min zoom.
        min: u8,
        /// Source max zoom.
        max: u8,
    },
    /// The extension does not match the source's format.
    #[error("source serves .{expected} tiles, not .{got}")]
    WrongFormat {
        /// Right extension.
        expected: &'static str,
        /// Given extension.
        got: String,
    },
    /// No such source.
    #[error("no tile source named {0:?}")]
    UnknownSource(String),
}

fn number(s: &str) -> Result<u64, TilePathError> {
    if s.is_empty() || s.len() > 10 || !s.bytes().all(|b| b.is_ascii_digit()) {
        return Err(TilePathError::BadNumber);
    }
    s.parse().map_err(|_| TilePathError::BadNumber)
}

/// Parses the path (no query) of a `/tiles/` request, checking it against
/// the configured sources.
///
/// # Errors
/// See [`TilePathError`].
pub fn parse_path(
    path: &str,
    sources: &[TileSource],
) -> Result<(TileRequest, usize), TilePathError> {
    let rest = path
        .strip_prefix("/tiles/")
        .ok_or(TilePathError::Malformed)?;
    let parts: Vec<&str> = rest.split('/').collect();
    let find = |name: &str| {
        sources
            .iter()
            .position(|s| s.name == name)
            .ok_or_else(|| TilePathError::UnknownSource(name.to_string()))
    };
    match parts.as_slice() {
        [one] => {
            let source = one.strip_suffix(".json").ok_or(TilePathError::Malformed)?;
            let i = find(source)?;
            Ok((
                TileRequest::TileJson {
                    source: source.to_string(),
                },
                i,
            ))
        }
        [source, z, x, yext] => {
            let (y, ext) = yext.rsplit_once('.').ok_or(TilePathError::Malformed)?;
            let (z, x, y) = (number(z)?, number(x)?, number(y)?);
            let i = find(source)?;
            let s = &sources[i];
            let out = || TilePathError::OutOfRange {
                z: z as u32,
                x,
                y,
                min: s.min_zoom,
                max: s.max_zoom,
            };
            if z < u64::from(s.min_zoom) || z > u64::from(s.max_zoom.min(MAX_ZOOM)) {
                return Err(out());
            }
            let side = 1u64 << z;
            if x >= side || y >= side {
                return Err(out());
            }
            if !s.format.matches_extension(ext) {
                return Err(TilePathError::WrongFormat {
                    expected: s.format.extension(),
                    got: ext.to_string(),
                });
            }
            Ok((
                TileRequest::Tile {
                    source: source.to_string(),
                    tile: TileId {
                        z: z as u8,
                        x: x as u32,
                        y: y as u32,
                    },
                    ext: ext.to_string(),
                },
                i,
            ))
        }
        _ => Err(TilePathError::Malformed),
    }
}

/// The cache key of a tile: by source name and address, not upstream URL,
/// so a source can move servers without losing its cache, and so every
/// rack computes the same key for the mesh.
pub fn cache_key(source: &str, t: TileId) -> String {
    format!("tile:{source}/{}/{}/{}", t.z, t.x, t.y)
}

/// Fills a source's URL template (`{z}`, `{x}`, `{y}`; `{-y}` for TMS).
pub fn upstream_url(template: &str, t: TileId) -> String {
    let tms_y = (1u64 << t.z) - 1 - u64::from(t.y);
    template
        .replace("{z}", &t.z.to_string())
        .replace("{x}", &t.x.to_string())
        .replace("{-y}", &tms_y.to_string())
        .replace("{y}", &t.y.to_string())
}

/// TileJSON 3.0.0 for a source, with tile URLs on `base` (e.g.
/// `http://10.0.0.5:3128`).
pub fn tilejson(source: &TileSource, base: &str) -> serde_json::Value {
    serde_json::json!({
        "tilejson": "3.0.0",
        "name": source.name,
        "scheme": "xyz",
        "format": source.format.extension(),
        "tiles": [format!("{base}/tiles/{}/{{z}}/{{x}}/{{y}}.{}", source.name, source.format.extension())],
        "minzoom": source.min_zoom,
        "maxzoom": source.max_zoom,
        "attribution": source.attribution,
        "bounds": [-180.0, -85.051_128_779_806_6, 180.0, 85.051_128_779_806_6],
    })
}

/// A bounding box in degrees, `west,south,east,north` (WGS84).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct BBox {
    /// West longitude.
    pub west: f64,
    /// South latitude.
    pub south: f64,
    /// East longitude.
    pub east: f64,
    /// North latitude.
    pub north: f64,
}

impl std::str::FromStr for BBox {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let v: Vec<f64> = s
            .split(',')
            .map(|p| p.trim().parse::<f64>().map_err(|e| format!("{p:?}: {e}")))
            .collect::<Result<_, _>>()?;
        let [west, south, east, north] = v[..] else {
            return Err("expected W,S,E,N".into());
        };
        if !(-180.0..=180.0).contains(&west) || !(-180.0..=180.0).contains(&east) {
            return Err("longitudes must be within -180..180".into());
        }
        if !(-90.0..=90.0).contains(&south) || !(-90.0..=90.0).contains(&north) || south > north {
            return Err("latitudes must be within -90..90 and south <= north".into());
        }
        if west > east {
            return Err("west > east (boxes across the antimeridian: split them)".into());
        }
        Ok(BBox {
            west,
            south,
            east,
            north,
        })
    }
}

fn lon_to_x(lon: f64, z: u8) -> u32 {
    let n = (1u64 << z) as f64;
    (((lon + 180.0) / 360.0 * n).floor().max(0.0) as u64).min((1u64 << z) - 1) as u32
}

fn lat_to_y(lat: f64, z: u8) -> u32 {
    let lat = lat
        .clamp(-85.051_128_779_806_6, 85.051_128_779_806_6)
        .to_radians();
    let n = (1u64 << z) as f64;
    let y = (1.0 - (lat.tan() + 1.0 / lat.cos()).ln() / std::f64::consts::PI) / 2.0 * n;
    (y.floor().max(0.0) as u64).min((1u64 << z) - 1) as u32
}

/// The tile range covering `bbox` at zoom `z`: `(x0..=x1, y0..=y1)`.
pub fn tile_range(bbox: &BBox, z: u8) -> (u32, u32, u32, u32) {
    (
        lon_to_x(bbox.west, z),
        lon_to_x(bbox.east, z),
        lat_to_y(bbox.north, z),
        lat_to_y(bbox.south, z),
    )
}

/// How many tiles cover `bbox` at zooms `zooms`.
pub fn tile_count(bbox: &BBox, zooms: std::ops::RangeInclusive<u8>) -> u64 {
    zooms
        .map(|z| {
            let (x0, x1, y0, y1) = tile_range(bbox, z);
            u64::from(x1 - x0 + 1) * u64::from(y1 - y0 + 1)
        })
        .sum()
}

/// Iterates the tiles covering `bbox`, zoom by zoom, row-major: the order
/// the seeder walks, so a resume cursor is just an index into it.
pub fn tiles(bbox: BBox, zooms: std::ops::RangeInclusive<u8>) -> impl Iterator<Item = TileId> {
    zooms.flat_map(move |z| {
        let (x0, x1, y0, y1) = tile_range(&bbox, z);
        (y0..=y1).flat_map(move |y| (x0..=x1).map(move |x| TileId { z, x, y }))
    })
}

/// The Content-Type we serve for `format`.
pub fn content_type(format: TileFormat) -> &'static str {
    format.content_type()
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn src() -> Vec<TileSource> {
        vec![TileSource {
            name: "osm".into(),
            url: "http://t.example/{z}/{x}/{y}.png".into(),
            format: TileFormat::Png,
            min_zoom: 0,
            max_zoom: 18,
            attribution: "(c) OSM".into(),
            allow_bulk: false,
            requests_per_sec: 2,
            user_agent: "x".into(),
        }]
    }

    #[test]
    fn paths() {
        let s = src();
        let (r, i) = parse_path("/tiles/osm/3/7/0.png", &s).unwrap();
        assert_eq!(i, 0);
        assert_eq!(
            r,
            TileRequest::Tile {
                source: "osm".into(),
                tile: TileId { z: 3, x: 7, y: 0 },
                ext: "png".into()
            }
        );
        assert_eq!(
            parse_path("/tiles/osm.json", &s).unwrap().0,
            TileRequest::TileJson {
                source: "osm".into()
            }
        );
        for bad in [
            "/tiles/osm/3/8/0.png",
            "/tiles/osm/19/0/0.png",
            "/tiles/osm/-1/0/0.png",
            "/tiles/osm/3/+1/0.png",
            "/tiles/osm/3/1/0",
            "/tiles/osm/3/1/0.jpg",
            "/tiles/osm/3/1/0/1.png",
            "/tiles/osm/99999999999/1/0.png",
            "/tiles/",
            "/tiles/osm/a/1/0.png",
        ] {
            assert!(parse_path(bad, &s).is_err(), "{bad}");
        }
        assert!(matches!(
            parse_path("/tiles/nope/1/0/0.png", &s),
            Err(TilePathError::UnknownSource(_))
        ));
    }

    #[test]
    fn templates() {
        let t = TileId { z: 2, x: 1, y: 0 };
        assert_eq!(
            upstream_url("http://a/{z}/{x}/{y}.png", t),
            "http://a/2/1/0.png"
        );
        assert_eq!(
            upstream_url("http://a/{z}/{x}/{-y}.png", t),
            "http://a/2/1/3.png"
        );
        assert_eq!(cache_key("osm", t), "tile:osm/2/1/0");
    }

    #[test]
    fn counts_match_published_figures() {
        // Port-au-Prince (ANCHORS.md): z0-16 ~2,540 tiles, z0-18 ~37,898.
        let pap: BBox = "-72.45,18.44,-72.21,18.67".parse().unwrap();
        let c16 = tile_count(&pap, 0..=16);
        assert!((2000..3200).contains(&c16), "{c16}");
        let c18 = tile_count(&pap, 0..=18);
        assert!((30_000..46_000).contains(&c18), "{c18}");
        assert_eq!(tiles(pap, 0..=16).count() as u64, c16);
        assert_eq!(
            tile_count(&"-180,-85,180,85".parse().unwrap(), 0..=2),
            1 + 4 + 16
        );
        assert!("10,0,5,1".parse::<BBox>().is_err());
    }

    proptest! {
        #[test]
        fn never_panics(p in "/tiles/[a-z0-9./-]{0,30}") {
            let _ = parse_path(&p, &src());
        }

        #[test]
        fn in_range_accepted(z in 0u8..=18, fx in 0.0f64..1.0, fy in 0.0f64..1.0) {
            let side = 1u64 << z;
            let x = ((side as f64) * fx) as u64 % side;
            let y = ((side as f64) * fy) as u64 % side;
            let path = format!("/tiles/osm/{z}/{x}/{y}.png");
            prop_assert!(parse_path(&path, &src()).is_ok());
            let path = format!("/tiles/osm/{z}/{}/{y}.png", side);
            prop_assert!(parse_path(&path, &src()).is_err());
        }
    }
}
