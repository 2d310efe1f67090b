//! A zone as an operator defines it: a GeoJSON Feature (Polygon or
//! MultiPolygon, holes allowed) with a name, a kind and an optional filter.
//! [`ZoneSpec::parse`] is the one gate: every refusal says why, and a spec
//! that exists is valid.

use geo::{
    orient::Direction, Coord, GeodesicArea, LineString, MultiPolygon, Orient, Polygon, Validation,
};
use geojson::{Feature, GeometryValue};
use hexfleet_model::{ZoneId, MAX_INDEXED_LAT};
use hexfleet_protocol::Filter;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

/// What a zone may be; configured in `[zones]`.
#[derive(Debug, Clone, Copy)]
pub struct ZoneLimits {
    pub max_vertices: usize,
    pub max_area_km2: f64,
}

#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum ZoneError {
    #[error("not a GeoJSON Feature: {0}")]
    NotGeoJson(String),
    #[error("the Feature has no geometry")]
    NoGeometry,
    #[error("the geometry must be a Polygon or a MultiPolygon, not a {0}")]
    NotAPolygon(String),
    #[error("{ring} has {positions} positions; a ring needs at least 4 (the first repeated last)")]
    TooFewPositions { ring: String, positions: usize },
    #[error("{ring} is not closed: its first position {first:?} differs from its last {last:?}")]
    Unclosed {
        ring: String,
        first: Vec<f64>,
        last: Vec<f64>,
    },
    #[error("{ring} has the position {position:?}, out of range: [longitude within ±180, latitude within ±{MAX_INDEXED_LAT}]")]
    OutOfRange { ring: String, position: Vec<f64> },
    #[error("the zone has {vertices} vertices; at most {max} are allowed")]
    TooManyVertices { vertices: usize, max: usize },
    #[error("invalid geometry: {0}")]
    Invalid(String),
    #[error("the zone spans {span:.1}° of longitude: one that crosses the antimeridian must be split into two polygons, one on each side")]
    Antimeridian { span: f64 },
    #[error("the zone covers {area_km2:.1} km²; at most {max_km2} km² are allowed")]
    TooLarge { area_km2: f64, max_km2: f64 },
    #[error("property {0}")]
    Property(String),
}

/// A valid zone.
#[derive(Debug, Clone, PartialEq)]
pub struct ZoneSpec {
    pub id: ZoneId,
    pub name: String,
    /// What the zone is for (`airport`, `service_area`, `venue`...): free
    /// text for the operator, at most 32 characters.
    pub kind: String,
    /// Which vehicles count as in the zone (any, by default).
    pub filter: Filter,
    /// Longitude as x, latitude as y, as GeoJSON has them.
    pub geometry: MultiPolygon<f64>,
    pub area_km2: f64,
}

/// The properties a zone reads from its Feature.
#[derive(Deserialize, Serialize, Default)]
#[serde(deny_unknown_fields)]
struct Properties {
    name: Option<String>,
    kind: Option<String>,
    filter: Option<Filter>,
}

const MAX_NAME: usize = 100;
const MAX_KIND: usize = 32;

impl ZoneSpec {
    /// Reads and checks a zone: the Feature's geometry, then its properties.
    pub fn parse(id: ZoneId, body: &[u8], limits: ZoneLimits) -> Result<Self, ZoneError> {
        let feature: Feature =
            serde_json::from_slice(body).map_err(|e| ZoneError::NotGeoJson(e.to_string()))?;
        let geometry = feature.geometry.ok_or(ZoneError::NoGeometry)?;
        let polygons = match &geometry.value {
            GeometryValue::Polygon { coordinates } => vec![coordinates.clone()],
            GeometryValue::MultiPolygon { coordinates } => coordinates.clone(),
            other => return Err(ZoneError::NotAPolygon(other.type_name().to_string())),
        };
        let mut vertices = 0;
        let mut built = Vec::with_capacity(polygons.len());
        for (p, rings) in polygons.iter().enumerate() {
            if rings.is_empty() {
                return Err(ZoneError::Invalid(format!("polygon {p} has no rings")));
            }
            let mut lines = Vec::with_capacity(rings.len());
            for (r, ring) in rings.iter().enumerate() {
                let name = if polygons.len() > 1 {
                    format!("ring {r} of polygon {p}")
                } else {
                    format!("ring {r}")
                };
                lines.push(ring_of(&name, ring)?);
                vertices += ring.len() - 1;
                if vertices > limits.max_vertices {
                    // Counted as it goes: a huge body stops here.
                    return Err(ZoneError::TooManyVertices {
                        vertices: polygons
                            .iter()
                            .flatten()
                            .map(|r| r.len().saturating_sub(1))
                            .sum(),
                        max: limits.max_vertices,
                    });
                }
            }
            let exterior = lines.remove(0);
            built.push(Polygon::new(exterior, lines));
        }
        let geometry = MultiPolygon::new(built);
        if let Err(e) = geometry.check_validation() {
            return Err(ZoneError::Invalid(e.to_string()));
        }
        let (west, east) = geometry
            .0
            .iter()
            .flat_map(|p| p.exterior().0.iter())
            .fold((f64::MAX, f64::MIN), |(w, e), c| (w.min(c.x), e.max(c.x)));
        if east - west > 180.0 {
            return Err(ZoneError::Antimeridian { span: east - west });
        }
        // Rings wound as the area wants them (GeoJSON senders often wind
        // holes like exteriors), or a hole would count as the rest of Earth.
        let area_km2 = geometry.orient(Direction::Default).geodesic_area_unsigned() / 1e6;
        if area_km2 > limits.max_area_km2 {
            return Err(ZoneError::TooLarge {
                area_km2,
                max_km2: limits.max_area_km2,
            });
        }
        let properties: Properties = match feature.properties {
            None => Properties::default(),
            Some(map) => serde_json::from_value(Value::Object(map))
                .map_err(|e| ZoneError::Property(e.to_string()))?,
        };
        let name = properties.name.unwrap_or_else(|| id.to_string());
        if name.is_empty() || name.chars().count() > MAX_NAME {
            return Err(ZoneError::Property(format!(
                "name must be 1 to {MAX_NAME} characters"
            )));
        }
        let kind = properties.kind.unwrap_or_else(|| "zone".to_string());
        let kind_ok = (1..=MAX_KIND).contains(&kind.len())
            && kind
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-'));
        if !kind_ok {
            return Err(ZoneError::Property(format!(
                "kind must be 1 to {MAX_KIND} characters of A-Z a-z 0-9 _ -"
            )));
        }
        Ok(Self {
            id,
            name,
            kind,
            filter: properties.filter.unwrap_or_else(Filter::any),
            geometry,
            area_km2,
        })
    }

    /// The zone as a GeoJSON Feature: what `GET /v1/zones/{id}` answers and
    /// what the store keeps (it is parsed again when read back).
    pub fn to_feature(&self) -> Value {
        json!({
            "type": "Feature",
            "id": self.id.as_str(),
            "properties": {
                "name": self.name,
                "kind": self.kind,
                "filter": self.filter,
            },
            "geometry": geojson::Geometry::new(GeometryValue::from(&self.geometry)),
        })
    }
}

/// One ring, checked: enough positions, closed, in range.
fn ring_of(name: &str, ring: &[geojson::Position]) -> Result<LineString<f64>, ZoneError> {
    if ring.len() < 4 {
        return Err(ZoneError::TooFewPositions {
            ring: name.to_string(),
            positions: ring.len(),
        });
    }
    let mut coords = Vec::with_capacity(ring.len());
    for position in ring {
        let p = position.as_slice();
        let in_range = p.len() >= 2
            && p[0].is_finite()
            && p[1].is_finite()
            && (-180.0..=180.0).contains(&p[0])
            && p[1].abs() <= MAX_INDEXED_LAT;
        if !in_range {
            return Err(ZoneError::OutOfRange {
                ring: name.to_string(),
                position: p.to_vec(),
            });
        }
        coords.push(Coord { x: p[0], y: p[1] });
    }
    let (first, last) = (&ring[0], &ring[ring.len() - 1]);
    if first.as_slice()[..2] != last.as_slice()[..2] {
        return Err(ZoneError::Unclosed {
            ring: name.to_string(),
            first: first.as_slice().to_vec(),
            last: last.as_slice().to_vec(),
        });
    }
    Ok(LineString::new(coords))
}

#[cfg(test)]
mod tests {
    use super::*;

    const LIMITS: ZoneLimits = ZoneLimits {
        max_vertices: 100,
        max_area_km2: 50.0,
    };

    fn parse(geometry: Value) -> Result<ZoneSpec, ZoneError> {
        let body = json!({"type": "Feature", "properties": {"name": "T1", "kind": "airport"}, "geometry": geometry});
        ZoneSpec::parse(
            ZoneId::new("z").unwrap(),
            body.to_string().as_bytes(),
            LIMITS,
        )
    }

    fn square(west: f64, south: f64, side: f64) -> Vec<[f64; 2]> {
        vec![
            [west, south],
            [west + side, south],
            [west + side, south + side],
            [west, south + side],
            [west, south],
        ]
    }

    #[test]
    fn a_square_with_a_hole_is_a_zone_and_reads_back_from_its_feature() {
        let spec = parse(json!({"type": "Polygon", "coordinates": [square(13.0, 52.0, 0.02), square(13.005, 52.005, 0.005)]})).unwrap();
        assert_eq!(spec.kind, "airport");
        assert!(
            (spec.area_km2 - 2.7 * 0.9375).abs() < 0.5,
            "{}",
            spec.area_km2
        );
        let again = ZoneSpec::parse(
            spec.id.clone(),
            spec.to_feature().to_string().as_bytes(),
            LIMITS,
        )
        .unwrap();
        assert_eq!(again, spec);
    }

    #[test]
    fn bad_zones_are_refused_with_their_reason() {
        let refused = |geometry: Value, needle: &str| {
            let e = parse(geometry).expect_err("refused").to_string();
            assert!(e.contains(needle), "{e:?} should say {needle:?}");
        };
        let bowtie = vec![
            [13.0, 52.0],
            [13.01, 52.01],
            [13.01, 52.0],
            [13.0, 52.01],
            [13.0, 52.0],
        ];
        refused(
            json!({"type": "Polygon", "coordinates": [bowtie]}),
            "invalid geometry",
        );
        let mut open = square(13.0, 52.0, 0.01);
        open[4] = [13.0, 52.001];
        refused(
            json!({"type": "Polygon", "coordinates": [open]}),
            "not closed",
        );
        refused(
            json!({"type": "Polygon", "coordinates": [[[13.0, 52.0], [13.1, 52.0], [13.0, 52.0]]]}),
            "at least 4",
        );
        refused(
            json!({"type": "Polygon", "coordinates": [square(13.0, 86.0, 0.01)]}),
            "out of range",
        );
        refused(
            json!({"type": "Polygon", "coordinates": [square(179.99, 0.0, 0.1)]}),
            "out of range",
        );
        refused(
            json!({"type": "Polygon", "coordinates": [square(13.0, 52.0, 1.0)]}),
            "at most 50 km²",
        );
        let many: Vec<[f64; 2]> = (0..=200)
            .map(|i| {
                let a = i as f64 / 200.0 * std::f64::consts::TAU;
                [13.0 + 0.01 * a.cos(), 52.0 + 0.01 * a.sin()]
            })
            .collect();
        refused(
            json!({"type": "Polygon", "coordinates": [many]}),
            "at most 100 are allowed",
        );
        refused(
            json!({"type": "Point", "coordinates": [13.0, 52.0]}),
            "not a Point",
        );
        refused(
            json!({"type": "MultiPolygon", "coordinates": [[square(-179.99, 0.0, 0.01)], [square(179.98, 0.0, 0.01)]]}),
            "antimeridian",
        );
        let e = ZoneSpec::parse(ZoneId::new("z").unwrap(), b"{\"type\": \"Feature\"", LIMITS)
            .unwrap_err();
        assert!(matches!(e, ZoneError::NotGeoJson(_)), "{e}");
        let body = json!({"type": "Feature", "properties": {"colour": "red"}, "geometry": {"type": "Polygon", "coordinates": [square(13.0, 52.0, 0.01)]}});
        let e = ZoneSpec::parse(
            ZoneId::new("z").unwrap(),
            body.to_string().as_bytes(),
            LIMITS,
        )
        .unwrap_err();
        assert!(e.to_string().contains("colour"), "{e}");
    }
}
