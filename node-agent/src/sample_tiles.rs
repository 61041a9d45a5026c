//! A generated sample map (PNG tiles in a PMTiles archive), so the demo and
//! the browser tests show a map with no tile server anywhere: land, a
//! coastline, a river and a street grid drawn in world coordinates, so
//! neighbouring tiles and zoom levels line up when panning and zooming.
//! Not a real map: it only has to look like one at a glance.

use std::io::Write;

use cache_proxy::pmtiles::{self, WriteOptions};
use cache_proxy::tiles::{self, BBox, TileId};

/// Tile edge in pixels.
const SIZE: u32 = 256;
/// The zoom whose pixel grid the features are drawn on.
const DETAIL_ZOOM: u32 = 17;

/// The sample region: a few kilometres of coast (west, south, east, north).
pub const SAMPLE_BBOX: BBox = BBox {
    west: -72.40,
    south: 18.50,
    east: -72.26,
    north: 18.59,
};
/// Zooms drawn over the whole region; zooms below are drawn over the
/// tiles that contain it, so the world view shows where it is.
pub const SAMPLE_ZOOMS: std::ops::RangeInclusive<u8> = 12..=15;

/// Colours (RGB).
const LAND: [u8; 3] = [0xf2, 0xef, 0xe6];
const PARK: [u8; 3] = [0xcd, 0xe8, 0xc4];
const WATER: [u8; 3] = [0xaa, 0xd3, 0xdf];
const ROAD: [u8; 3] = [0xff, 0xff, 0xff];
const ROAD_EDGE: [u8; 3] = [0xc9, 0xc2, 0xb4];
const MAIN_ROAD: [u8; 3] = [0xf7, 0xc9, 0x6b];

/// What lies at a point, in `DETAIL_ZOOM` pixel coordinates.
fn colour(gx: f64, gy: f64, scale: f64) -> [u8; 3] {
    // The coast: sea to the north of a wavy line.
    let coast = tiles_y(18.552) + 700.0 * (gx / 2500.0).sin() + 200.0 * (gx / 700.0).cos();
    if gy < coast {
        return WATER;
    }
    // A river winding south from the coast.
    let river_x = tiles_x(-72.335) + 400.0 * (gy / 1300.0).sin();
    let half = (14.0_f64).max(scale * 1.5);
    if (gx - river_x).abs() < half {
        return WATER;
    }
    // Streets every 300 px of the detail zoom, main roads every 1500.
    let w = (4.0_f64).max(scale * 0.8);
    let mx = gx.rem_euclid(1500.0);
    let my = gy.rem_euclid(1500.0);
    if mx < w * 2.5 || my < w * 2.5 {
        return MAIN_ROAD;
    }
    if scale <= 8.0 {
        let sx = gx.rem_euclid(300.0);
        let sy = gy.rem_euclid(300.0);
        if sx < w || sy < w {
            return ROAD;
        }
        if sx < w + scale.max(1.5) || sy < w + scale.max(1.5) {
            return ROAD_EDGE;
        }
    }
    // A park in one block of every few.
    let bx = (gx / 1500.0).floor() as i64;
    let by = (gy / 1500.0).floor() as i64;
    if (bx * 7 + by * 3).rem_euclid(5) == 0 {
        return PARK;
    }
    LAND
}

/// Longitude to `DETAIL_ZOOM` pixels.
fn tiles_x(lon: f64) -> f64 {
    (lon + 180.0) / 360.0 * f64::from(1u32 << DETAIL_ZOOM) * f64::from(SIZE)
}

/// Latitude to `DETAIL_ZOOM` pixels.
fn tiles_y(lat: f64) -> f64 {
    let r = lat.to_radians();
    (1.0 - (r.tan() + 1.0 / r.cos()).ln() / std::f64::consts::PI) / 2.0
        * f64::from(1u32 << DETAIL_ZOOM)
        * f64::from(SIZE)
}

/// One tile as a PNG.
pub fn render(t: TileId) -> Vec<u8> {
    let scale = f64::from(1u32 << (DETAIL_ZOOM - u32::from(t.z).min(DETAIL_ZOOM)));
    let mut raw = Vec::with_capacity(((SIZE * 3 + 1) * SIZE) as usize);
    for py in 0..SIZE {
        raw.push(0); // filter: none
        for px in 0..SIZE {
            let gx = (f64::from(t.x * SIZE + px) + 0.5) * scale;
            let gy = (f64::from(t.y * SIZE + py) + 0.5) * scale;
            raw.extend_from_slice(&colour(gx, gy, scale));
        }
    }
    png(SIZE, SIZE, &raw)
}

/// A PNG (8-bit RGB) of filtered scanlines.
fn png(w: u32, h: u32, scanlines: &[u8]) -> Vec<u8> {
    let mut out = b"\x89PNG\r\n\x1a\n".to_vec();
    let mut ihdr = Vec::new();
    ihdr.extend_from_slice(&w.to_be_bytes());
    ihdr.extend_from_slice(&h.to_be_bytes());
    ihdr.extend_from_slice(&[8, 2, 0, 0, 0]);
    chunk(&mut out, b"IHDR", &ihdr);
    let mut z = flate2::write::ZlibEncoder::new(Vec::new(), flate2::Compression::default());
    z.write_all(scanlines).expect("writing to memory");
    chunk(&mut out, b"IDAT", &z.finish().expect("writing to memory"));
    chunk(&mut out, b"IEND", &[]);
    out
}

fn chunk(out: &mut Vec<u8>, kind: &[u8; 4], data: &[u8]) {
    out.extend_from_slice(&(data.len() as u32).to_be_bytes());
    out.extend_from_slice(kind);
    out.extend_from_slice(data);
    let mut crc = flate2::Crc::new();
    crc.update(kind);
    crc.update(data);
    out.extend_from_slice(&crc.sum().to_be_bytes());
}

/// Every tile of the sample: the region at [`SAMPLE_ZOOMS`], and the tiles
/// containing it at the zooms below.
pub fn sample_tiles() -> Vec<TileId> {
    let mut all: Vec<TileId> = tiles::tiles(SAMPLE_BBOX, 0..=*SAMPLE_ZOOMS.end()).collect();
    all.dedup();
    all
}

/// The sample as a PMTiles archive (what `fieldrack tiles import` takes).
pub fn sample_pmtiles() -> Vec<u8> {
    let tiles: Vec<(TileId, Vec<u8>)> =
        sample_tiles().into_iter().map(|t| (t, render(t))).collect();
    pmtiles::write(
        &tiles,
        &WriteOptions {
            metadata: r#"{"name":"Fieldrack sample map","attribution":"generated sample, not a real map"}"#.into(),
            ..WriteOptions::default()
        },
    )
}

/// `#zoom/lat/lon` of the sample's centre, for the map's URL: at zoom 14
/// a laptop's or a phone's screen shows only held tiles.
pub fn sample_view() -> String {
    let b = SAMPLE_BBOX;
    format!(
        "#14/{:.4}/{:.4}",
        (b.south + b.north) / 2.0,
        (b.west + b.east) / 2.0
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;

    #[test]
    fn tiles_are_valid_pngs_and_differ() {
        let a = render(TileId {
            z: 15,
            x: 9799,
            y: 14666,
        });
        assert_eq!(&a[..8], b"\x89PNG\r\n\x1a\n");
        assert_eq!(&a[12..16], b"IHDR");
        // The image data inflates to 256 scanlines of 1 + 256 × 3 bytes.
        let len = u32::from_be_bytes(a[33..37].try_into().unwrap()) as usize;
        assert_eq!(&a[37..41], b"IDAT");
        let mut raw = Vec::new();
        flate2::read::ZlibDecoder::new(&a[41..41 + len])
            .read_to_end(&mut raw)
            .unwrap();
        assert_eq!(raw.len(), 256 * (1 + 256 * 3));
        let b = render(TileId {
            z: 15,
            x: 9800,
            y: 14666,
        });
        assert_ne!(a, b);
        let n = sample_tiles().len();
        assert!((50..2000).contains(&n), "{n} tiles");
    }
}
