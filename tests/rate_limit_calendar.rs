//! Calendar quotas (`Rule::calendar`): the periods across month ends, leap days, year ends and
//! UTC offsets, checked against a naive calendar written here (no shared code with the crate):
//! - the Lua that the Redis stores run, evaluated with a given time (`calendar_period_script`,
//!   the very `calendar.lua` fragment of the production scripts);
//! - the memory store with its civil clock set and `tokio::time::pause()`d time;
//! - end to end through the layer on every store (`stores!`): the `RateLimit` field's `t` and
//!   `Retry-After` are the seconds to the next boundary computed here from the system clock.
#![cfg(feature = "test-support")]

mod common;

use std::{
    convert::Infallible,
    net::SocketAddr,
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use bytes::Bytes;
use common::stores::{stores, Env};
use http::{Request, Response, StatusCode};
use http_body_util::Full;
use tower::{service_fn, ServiceBuilder, ServiceExt};
use tower_redis_layers::{
    rate_limit::{Calendar, Headers, LocalFallback, Policy, RateLimitLayer, Rule, UtcOffset},
    store::{Decision, MemoryStore, RateCheck, RateLimitStore, RateSettlement},
    StoreError, StoreKey,
};

// ---------------------------------------------------------------------------------------------
// The naive calendar: years and months counted one by one from 1970.

const DAY: i64 = 86_400;

fn leap(y: i64) -> bool {
    (y % 4 == 0 && y % 100 != 0) || y % 400 == 0
}

fn month_len(y: i64, m: i64) -> i64 {
    match m {
        2 if leap(y) => 29,
        2 => 28,
        4 | 6 | 9 | 11 => 30,
        _ => 31,
    }
}

/// Days since 1970-01-01 of a date, counting whole years and months.
fn days_of(y: i64, m: i64, d: i64) -> i64 {
    let mut days = 0;
    if y >= 1970 {
        days += (1970..y)
            .map(|y| if leap(y) { 366 } else { 365 })
            .sum::<i64>();
    } else {
        days -= (y..1970)
            .map(|y| if leap(y) { 366 } else { 365 })
            .sum::<i64>();
    }
    days + (1..m).map(|m| month_len(y, m)).sum::<i64>() + d - 1
}

/// The date of a day since 1970-01-01, walking years then months.
fn date_of(mut days: i64) -> (i64, i64, i64) {
    let mut y = 1970;
    while days < 0 {
        y -= 1;
        days += if leap(y) { 366 } else { 365 };
    }
    while days >= if leap(y) { 366 } else { 365 } {
        days -= if leap(y) { 366 } else { 365 };
        y += 1;
    }
    let mut m = 1;
    while days >= month_len(y, m) {
        days -= month_len(y, m);
        m += 1;
    }
    (y, m, days + 1)
}

/// Seconds since the epoch of a date and time in UTC.
fn utc(y: i64, m: i64, d: i64, h: i64, min: i64, s: i64) -> i64 {
    days_of(y, m, d) * DAY + h * 3600 + min * 60 + s
}

/// The naive period holding `t` (seconds since the epoch): its first day (days since the epoch
/// on the offset's clock) and its end (seconds since the epoch).
fn naive_period(t: i64, period: Calendar, offset_min: i64) -> (i64, i64) {
    let local = t + offset_min * 60;
    let day = local.div_euclid(DAY);
    let (first, after) = match period {
        Calendar::Day => (day, day + 1),
        Calendar::Week => {
            // 2024-01-01 was a Monday.
            let first = day - (day - days_of(2024, 1, 1)).rem_euclid(7);
            (first, first + 7)
        }
        _ => {
            let (y, m, _) = date_of(day);
            let next = if m == 12 {
                days_of(y + 1, 1, 1)
            } else {
                days_of(y, m + 1, 1)
            };
            (days_of(y, m, 1), next)
        }
    };
    (first, after * DAY - offset_min * 60)
}

/// The cases the calendar must get right: (time, period, offset in minutes, expected end).
fn cases() -> Vec<(i64, Calendar, i16, i64)> {
    use Calendar::{Day, Month, Week};
    vec![
        // Jan 31 -> Feb 1.
        (
            utc(2024, 1, 31, 23, 59, 59),
            Month,
            0,
            utc(2024, 2, 1, 0, 0, 0),
        ),
        (
            utc(2024, 1, 31, 23, 59, 59),
            Day,
            0,
            utc(2024, 2, 1, 0, 0, 0),
        ),
        // Feb 28 -> Feb 29 (2024) -> Mar 1.
        (
            utc(2024, 2, 28, 23, 0, 0),
            Day,
            0,
            utc(2024, 2, 29, 0, 0, 0),
        ),
        (
            utc(2024, 2, 28, 23, 0, 0),
            Month,
            0,
            utc(2024, 3, 1, 0, 0, 0),
        ),
        (utc(2024, 2, 29, 0, 0, 0), Day, 0, utc(2024, 3, 1, 0, 0, 0)),
        (
            utc(2024, 2, 29, 23, 59, 59),
            Month,
            0,
            utc(2024, 3, 1, 0, 0, 0),
        ),
        (
            utc(2000, 2, 28, 12, 0, 0),
            Month,
            0,
            utc(2000, 3, 1, 0, 0, 0),
        ),
        (
            utc(2000, 2, 28, 12, 0, 0),
            Day,
            0,
            utc(2000, 2, 29, 0, 0, 0),
        ),
        // Feb 28 -> Mar 1 (2023, 2100: not leap years).
        (utc(2023, 2, 28, 23, 0, 0), Day, 0, utc(2023, 3, 1, 0, 0, 0)),
        (
            utc(2023, 2, 28, 23, 0, 0),
            Month,
            0,
            utc(2023, 3, 1, 0, 0, 0),
        ),
        (utc(2100, 2, 28, 23, 0, 0), Day, 0, utc(2100, 3, 1, 0, 0, 0)),
        (utc(2100, 2, 1, 0, 0, 0), Month, 0, utc(2100, 3, 1, 0, 0, 0)),
        // 30-day months, and December into January.
        (
            utc(2024, 4, 30, 23, 59, 59),
            Month,
            0,
            utc(2024, 5, 1, 0, 0, 0),
        ),
        (
            utc(2024, 12, 31, 23, 59, 59),
            Month,
            0,
            utc(2025, 1, 1, 0, 0, 0),
        ),
        // ISO weeks across year ends: 2026-01-01 is a Thursday (its week started Monday
        // 2025-12-29), 2024-12-31 a Tuesday (week 1 of 2025), 2021-01-01 a Friday (week 53 of
        // 2020, from 2020-12-28).
        (
            utc(2025, 12, 31, 12, 0, 0),
            Week,
            0,
            utc(2026, 1, 5, 0, 0, 0),
        ),
        (utc(2026, 1, 1, 0, 0, 0), Week, 0, utc(2026, 1, 5, 0, 0, 0)),
        (
            utc(2024, 12, 31, 0, 0, 0),
            Week,
            0,
            utc(2025, 1, 6, 0, 0, 0),
        ),
        (utc(2021, 1, 1, 0, 0, 0), Week, 0, utc(2021, 1, 4, 0, 0, 0)),
        (
            utc(2024, 1, 7, 23, 59, 59),
            Week,
            0,
            utc(2024, 1, 8, 0, 0, 0),
        ),
        (utc(2024, 1, 8, 0, 0, 0), Week, 0, utc(2024, 1, 15, 0, 0, 0)),
        // +05:30: midnight in India is 18:30 UTC the day before.
        (
            utc(2024, 2, 28, 18, 29, 59),
            Day,
            330,
            utc(2024, 2, 28, 18, 30, 0),
        ),
        (
            utc(2024, 2, 28, 18, 30, 0),
            Day,
            330,
            utc(2024, 2, 29, 18, 30, 0),
        ),
        (
            utc(2024, 1, 31, 18, 30, 0),
            Month,
            330,
            utc(2024, 2, 29, 18, 30, 0),
        ),
        // -08:00: at 07:00 UTC on Mar 1 it is still Feb 29 in California.
        (
            utc(2024, 3, 1, 7, 0, 0),
            Day,
            -480,
            utc(2024, 3, 1, 8, 0, 0),
        ),
        (
            utc(2024, 3, 1, 7, 0, 0),
            Month,
            -480,
            utc(2024, 3, 1, 8, 0, 0),
        ),
        (
            utc(2024, 3, 1, 8, 0, 0),
            Month,
            -480,
            utc(2024, 4, 1, 8, 0, 0),
        ),
        (
            utc(2026, 1, 5, 7, 59, 59),
            Week,
            -480,
            utc(2026, 1, 5, 8, 0, 0),
        ),
    ]
}

fn rule(limit: u64, period: Calendar, offset_min: i16) -> Rule {
    Rule::calendar(limit, period).utc_offset(UtcOffset::minutes(offset_min))
}

#[test]
fn the_naive_calendar_agrees_with_the_cases() {
    for (t, period, offset, end) in cases() {
        assert_eq!(
            naive_period(t, period, i64::from(offset)).1,
            end,
            "{t} {period:?} {offset}"
        );
    }
}

#[test]
fn offsets_parse_and_print() {
    assert_eq!("+05:30".parse::<UtcOffset>(), Ok(UtcOffset::minutes(330)));
    assert_eq!("-08:00".parse::<UtcOffset>(), Ok(UtcOffset::hours(-8)));
    assert_eq!("-00:30".parse::<UtcOffset>(), Ok(UtcOffset::minutes(-30)));
    assert_eq!("Z".parse::<UtcOffset>(), Ok(UtcOffset::UTC));
    assert_eq!("+0545".parse::<UtcOffset>(), Ok(UtcOffset::minutes(345)));
    assert_eq!("-03".parse::<UtcOffset>(), Ok(UtcOffset::hours(-3)));
    for bad in [
        "05:30", "+24:00", "+05:60", "+5:3x", "", "+", "+1é2", "+é12",
    ] {
        assert!(bad.parse::<UtcOffset>().is_err(), "{bad:?}");
    }
    assert_eq!(UtcOffset::minutes(-570).to_string(), "-09:30");
    assert_eq!(
        rule(5, Calendar::Week, 330).policy_name(),
        "calendar-5-week-utc+05:30"
    );
    assert_eq!(
        rule(5, Calendar::Month, 0).policy_name(),
        "calendar-5-month"
    );
    assert_eq!(
        rule(5, Calendar::Month, 0).window(),
        Duration::from_secs(30 * DAY as u64)
    );
    // The offset only applies to calendar rules.
    let fixed = Rule::fixed_window(5, Duration::from_secs(1));
    assert_eq!(fixed.clone().utc_offset(UtcOffset::hours(3)), fixed);
}

// ---------------------------------------------------------------------------------------------
// The Lua fragment, with a given time.

#[cfg(feature = "redis")]
mod lua {
    use super::*;
    use common::RedisServer;
    use tower_redis_layers::store::{calendar_period_script, calendar_spec};

    async fn period(
        con: &mut ::redis::aio::MultiplexedConnection,
        now_us: i64,
        rule: &Rule,
    ) -> (i64, i64) {
        let spec = calendar_spec(rule).expect("a calendar rule");
        let reply: Vec<i64> = ::redis::cmd("EVAL")
            .arg(calendar_period_script())
            .arg(0)
            .arg(now_us)
            .arg(spec)
            .query_async(con)
            .await
            .expect("EVAL");
        (reply[0], reply[1])
    }

    #[tokio::test]
    async fn the_scripts_find_the_calendar_boundaries() {
        let server = RedisServer::start();
        let client = ::redis::Client::open(server.url()).unwrap();
        let mut con = client.get_multiplexed_async_connection().await.unwrap();
        for (t, cal, offset, end) in cases() {
            let (first, got) = period(&mut con, t * 1_000_000, &rule(1, cal, offset)).await;
            assert_eq!(got, end * 1_000_000, "{t} {cal:?} {offset}: end");
            let expected = naive_period(t, cal, i64::from(offset));
            assert_eq!(first, expected.0, "{t} {cal:?} {offset}: first day");
            // One microsecond before the end is still in the period; the end starts the next.
            let (_, same) = period(&mut con, end * 1_000_000 - 1, &rule(1, cal, offset)).await;
            assert_eq!(
                same,
                end * 1_000_000,
                "{t} {cal:?} {offset}: just before the end"
            );
            let (next, after) = period(&mut con, end * 1_000_000, &rule(1, cal, offset)).await;
            assert!(
                after > end * 1_000_000 && next > first,
                "{t} {cal:?} {offset}"
            );
        }
    }

    /// Times spread from 1901 to 2199, with every period and several offsets, agree with the
    /// naive calendar.
    #[tokio::test]
    async fn the_scripts_agree_with_the_naive_calendar_over_three_centuries() {
        let server = RedisServer::start();
        let client = ::redis::Client::open(server.url()).unwrap();
        let mut con = client.get_multiplexed_async_connection().await.unwrap();
        let from = utc(1901, 1, 1, 0, 0, 0);
        let to = utc(2199, 12, 31, 0, 0, 0);
        let offsets = [0, 330, -480, 345, -570, 840, -720, 1439, -1439];
        let periods = [Calendar::Day, Calendar::Week, Calendar::Month];
        for i in 0..3000i64 {
            // A deterministic spread (a large odd step modulo the range), with odd seconds.
            let t = from + (i * 2_654_435_761 + i * i * 7) % (to - from);
            let cal = periods[i as usize % 3];
            let offset = offsets[i as usize % offsets.len()];
            let us = t * 1_000_000 + i % 1_000_000;
            let got = period(&mut con, us, &rule(1, cal, offset)).await;
            let (first, end) = naive_period(t, cal, i64::from(offset));
            assert_eq!(got, (first, end * 1_000_000), "{t} {cal:?} {offset}");
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The memory store, with its civil clock set and paused time.

fn key(n: u8) -> StoreKey {
    StoreKey::from_parts([[n; 16].as_slice()])
}

fn system(t: i64) -> SystemTime {
    UNIX_EPOCH + Duration::from_secs(u64::try_from(t).unwrap())
}

async fn take(
    store: &MemoryStore,
    key: &StoreKey,
    rules: &[Rule],
    cost: u64,
) -> (bool, u64, Duration, Duration) {
    let d = store
        .check(RateCheck::new(key, rules, cost, true))
        .await
        .expect("the memory store answers");
    (
        d.allowed,
        d.rules[0].remaining,
        d.rules[0].reset,
        d.retry_after,
    )
}

/// For each case: the quota is used up a second before the boundary, denied with a wait of
/// that second, and whole again at the boundary with a reset of the next period's length.
#[tokio::test(start_paused = true)]
async fn the_memory_store_starts_each_period_at_its_boundary() {
    for (i, (_, cal, offset, end)) in cases().into_iter().enumerate() {
        let store = MemoryStore::new();
        store.set_wall_clock(system(end - 1));
        let k = key(i as u8);
        let rules = [rule(3, cal, offset)];
        let ctx = format!("{cal:?} {offset} ending {end}");
        assert_eq!(
            take(&store, &k, &rules, 2).await,
            (true, 1, Duration::from_secs(1), Duration::ZERO),
            "{ctx}"
        );
        assert!(take(&store, &k, &rules, 1).await.0, "{ctx}");
        let (allowed, remaining, reset, retry) = take(&store, &k, &rules, 1).await;
        assert!(!allowed, "{ctx}: over the quota");
        assert_eq!(
            (remaining, reset, retry),
            (0, Duration::from_secs(1), Duration::from_secs(1)),
            "{ctx}"
        );
        tokio::time::advance(Duration::from_millis(999)).await;
        assert!(
            !take(&store, &k, &rules, 1).await.0,
            "{ctx}: a millisecond early"
        );
        tokio::time::advance(Duration::from_millis(1)).await;
        let next = naive_period(end, cal, i64::from(offset)).1;
        let (allowed, remaining, reset, _) = take(&store, &k, &rules, 1).await;
        assert!(allowed, "{ctx}: a new period");
        assert_eq!(remaining, 2, "{ctx}");
        assert_eq!(reset, Duration::from_secs((next - end) as u64), "{ctx}");
    }
}

/// A week that spans a year end is one period: crossing Jan 1 does not start a new one.
#[tokio::test(start_paused = true)]
async fn an_iso_week_spans_the_year_end() {
    let store = MemoryStore::new();
    store.set_wall_clock(system(utc(2025, 12, 31, 23, 0, 0)));
    let rules = [rule(2, Calendar::Week, 0)];
    let k = key(200);
    assert!(take(&store, &k, &rules, 2).await.0);
    tokio::time::advance(Duration::from_secs(2 * 3600)).await; // 2026-01-01 01:00
    let (allowed, _, _, retry) = take(&store, &k, &rules, 1).await;
    assert!(!allowed, "Jan 1 is in the same ISO week");
    let monday = utc(2026, 1, 5, 0, 0, 0) - utc(2026, 1, 1, 1, 0, 0);
    assert_eq!(retry, Duration::from_secs(monday as u64));
    // A calendar rule and a fixed window together: all or nothing.
    let both = [
        rule(5, Calendar::Day, 0),
        Rule::fixed_window(1, Duration::from_secs(60)),
    ];
    let k = key(201);
    assert!(take(&store, &k, &both, 1).await.0);
    assert!(!take(&store, &k, &both, 1).await.0);
    tokio::time::advance(Duration::from_secs(60)).await;
    let (allowed, remaining, _, _) = take(&store, &k, &both, 1).await;
    assert!(allowed);
    assert_eq!(remaining, 3, "the denied request took nothing from the day");
}

// ---------------------------------------------------------------------------------------------
// End to end through the layer, on every store.

type Req = Request<Full<Bytes>>;

fn request() -> Req {
    let mut req = Request::builder().uri("/").body(Full::default()).unwrap();
    req.extensions_mut()
        .insert::<SocketAddr>("10.20.30.40:1000".parse().unwrap());
    req
}

fn now_secs() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs_f64()
}

/// The whole seconds from `at` to the end of its period (what `t` and `Retry-After` show).
fn secs_to_boundary(at: f64, cal: Calendar, offset: i16) -> i64 {
    let end = naive_period(at.floor() as i64, cal, i64::from(offset)).1;
    (end as f64 - at).ceil() as i64
}

fn field<B>(res: &Response<B>, name: &str) -> String {
    res.headers()
        .get(name)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_owned()
}

/// `t=` of the `RateLimit` field's first item.
fn t_of(ratelimit: &str) -> i64 {
    let t = ratelimit.split(";t=").nth(1).expect("t");
    t.split(|c: char| !c.is_ascii_digit())
        .next()
        .unwrap()
        .parse()
        .unwrap()
}

/// Asserts that `secs` is the time to the boundary seen from some instant in `[before, after]`.
fn assert_boundary(secs: i64, before: f64, after: f64, cal: Calendar, offset: i16, what: &str) {
    let (a, b) = (
        secs_to_boundary(after, cal, offset),
        secs_to_boundary(before, cal, offset),
    );
    assert!(
        (a.min(b)..=a.max(b)).contains(&secs),
        "{what}: {secs} s, expected {a}..={b} s ({cal:?} {offset})"
    );
}

async fn headers_point_at_the_next_boundary(env: Env) {
    let inner = service_fn(|_req: Req| async {
        Ok::<_, Infallible>(Response::new(Full::<Bytes>::from("ok")))
    });
    for (cal, offset, w) in [
        (Calendar::Day, 0, 86_400),
        (Calendar::Day, 330, 86_400),
        (Calendar::Week, -480, 604_800),
        (Calendar::Month, 0, 2_592_000),
        (Calendar::Month, 330, 2_592_000),
    ] {
        let scope = format!("cal-{cal:?}-{offset}");
        // One rule (its own script) and the same rule with a fixed window (the multi-rule one).
        for multi in [false, true] {
            let mut policy = Policy::new("quota", rule(2, cal, offset).name("quota"))
                .scope(format!("{scope}-{multi}"));
            if multi {
                policy =
                    policy.rule(Rule::fixed_window(100, Duration::from_secs(3600)).name("hourly"));
            }
            let layer = RateLimitLayer::new(env.store().await, policy).headers(Headers::All);
            let svc = ServiceBuilder::new().layer(layer).service(inner);
            let what = format!("{cal:?} {offset} multi={multi}");
            for n in 0..3 {
                let before = now_secs();
                let res = svc.clone().oneshot(request()).await.unwrap();
                let after = now_secs();
                let ratelimit = field(&res, "ratelimit");
                let policy = field(&res, "ratelimit-policy");
                assert!(
                    policy.starts_with(&format!("\"quota\";q=2;w={w}")),
                    "{what}: {policy}"
                );
                assert!(
                    ratelimit.starts_with(&format!("\"quota\";r={}", 1 - n.min(1))),
                    "{what}: {ratelimit}"
                );
                assert_boundary(
                    t_of(&ratelimit),
                    before,
                    after,
                    cal,
                    offset,
                    &format!("{what}: t of request {n}"),
                );
                if n < 2 {
                    assert_eq!(res.status(), StatusCode::OK, "{what}: request {n}");
                } else {
                    assert_eq!(res.status(), StatusCode::TOO_MANY_REQUESTS, "{what}");
                    let retry: i64 = field(&res, "retry-after").parse().unwrap();
                    assert_boundary(
                        retry,
                        before,
                        after,
                        cal,
                        offset,
                        &format!("{what}: Retry-After"),
                    );
                }
            }
            // Denied again (from the local deny cache on the Redis stores): the same boundary.
            let before = now_secs();
            let res = svc.clone().oneshot(request()).await.unwrap();
            let after = now_secs();
            assert_eq!(res.status(), StatusCode::TOO_MANY_REQUESTS, "{what}");
            let retry: i64 = field(&res, "retry-after").parse().unwrap();
            assert_boundary(
                retry,
                before,
                after,
                cal,
                offset,
                &format!("{what}: cached Retry-After"),
            );
        }
        // On Redis, the counters expire at the boundary.
        let at = now_secs();
        let mut expiring = 0;
        for (node, key) in env.keys("*:6.*") {
            let pttl: i64 = node.cli(&["PTTL", &key]).unwrap().trim().parse().unwrap();
            let (spec_cal, spec_offset) = spec_of(&key);
            if (spec_cal, spec_offset) != (cal, offset) {
                continue;
            }
            let end = naive_period(at.floor() as i64, cal, i64::from(offset)).1 as f64;
            let expected = (end - at) * 1000.0;
            assert!(
                (pttl as f64 - expected).abs() < 5_000.0,
                "{key}: expires in {pttl} ms, the boundary is in {expected} ms"
            );
            expiring += 1;
        }
        if !env.servers().is_empty() {
            assert_eq!(expiring, 2, "one counter per policy ({cal:?} {offset})");
        }
    }
}

/// The period and offset of a calendar counter's key (`...:6.<limit>.<ms>.<spec>`).
fn spec_of(key: &str) -> (Calendar, i16) {
    let spec: i64 = key.rsplit('.').next().unwrap().parse().unwrap();
    let cal = match spec / 10_000 {
        1 => Calendar::Day,
        2 => Calendar::Week,
        _ => Calendar::Month,
    };
    (cal, (spec % 10_000 - 1440) as i16)
}

/// A metered cost settles on a calendar rule: a charge or a refund moves the period's count, in
/// one rule or among others (the multi-rule settlement), never below zero.
async fn metered_costs_settle_on_the_period(env: Env) {
    let store = env.store().await;
    for (i, period) in [Calendar::Day, Calendar::Week, Calendar::Month]
        .into_iter()
        .enumerate()
    {
        for multi in [false, true] {
            let mut rules = vec![rule(100, period, 330)];
            if multi {
                rules.push(Rule::fixed_window(1000, Duration::from_secs(3600)));
            }
            let key = StoreKey::from_parts([format!("settle-{i}-{multi}").as_bytes()]);
            let what = format!("{period:?} multi={multi}");
            let left = |d: Decision| d.rules[0].remaining;
            let check = |cost| store.check(RateCheck::new(&key, &rules, cost, true));
            assert_eq!(left(check(10).await.unwrap()), 90, "{what}");
            // The actual cost was 3: 7 back.
            let refund = RateSettlement::new(&key, &rules, -7, Duration::ZERO);
            store.settle(refund).await.expect("settles");
            assert_eq!(left(check(0).await.unwrap()), 97, "{what}: refunded");
            // The actual cost was 50 more than estimated: charged.
            let charge = RateSettlement::new(&key, &rules, 50, Duration::ZERO);
            store.settle(charge).await.expect("settles");
            assert_eq!(left(check(0).await.unwrap()), 47, "{what}: charged");
            // A refund larger than what was counted stops at zero.
            let refund = RateSettlement::new(&key, &rules, -1000, Duration::ZERO);
            store.settle(refund).await.expect("settles");
            assert_eq!(
                left(check(0).await.unwrap()),
                100,
                "{what}: back to the full quota"
            );
        }
    }
}

/// A settlement that arrives after its check's period ended changes nothing in the new one.
#[tokio::test(start_paused = true)]
async fn a_late_settlement_leaves_the_next_period_alone() {
    let store = MemoryStore::new();
    let end = utc(2024, 3, 1, 0, 0, 0);
    store.set_wall_clock(system(end - 2));
    let rules = [rule(10, Calendar::Month, 0)];
    let k = key(250);
    assert_eq!(take(&store, &k, &rules, 4).await.1, 6);
    tokio::time::advance(Duration::from_secs(3)).await;
    // March: a new period, then the settlement of February's check (answered 3 s ago).
    assert_eq!(take(&store, &k, &rules, 1).await.1, 9);
    let charge = RateSettlement::new(&k, &rules, 5, Duration::from_secs(3));
    store.settle(charge).await.unwrap();
    assert_eq!(take(&store, &k, &rules, 0).await.1, 9, "February's charge");
    // A settlement of March's check applies.
    let refund = RateSettlement::new(&k, &rules, -1, Duration::ZERO);
    store.settle(refund).await.unwrap();
    assert_eq!(take(&store, &k, &rules, 0).await.1, 10);
}

/// A store that is always down (its breaker open).
#[derive(Clone)]
struct Down;

impl RateLimitStore for Down {
    type Future = std::future::Ready<Result<Decision, StoreError>>;

    fn check(&self, _check: RateCheck<'_>) -> Self::Future {
        std::future::ready(Err(StoreError::CircuitOpen(Duration::from_secs(1))))
    }
}

/// While the store is down, the local fallback keeps the calendar: each of 2 replicas admits
/// half the day's quota, and its `429` waits for the same boundary.
#[tokio::test]
async fn the_local_fallback_keeps_the_calendar() {
    let inner = service_fn(|_req: Req| async {
        Ok::<_, Infallible>(Response::new(Full::<Bytes>::from("ok")))
    });
    for (cal, offset) in [(Calendar::Day, -480), (Calendar::Month, 330)] {
        let policy = Policy::new("daily", rule(4, cal, offset));
        let layer = RateLimitLayer::new(Down, policy).local_fallback(LocalFallback::new(2));
        let svc = ServiceBuilder::new().layer(layer).service(inner);
        for _ in 0..2 {
            let res = svc.clone().oneshot(request()).await.unwrap();
            assert_eq!(res.status(), StatusCode::OK, "{cal:?}");
        }
        let before = now_secs();
        let res = svc.clone().oneshot(request()).await.unwrap();
        let after = now_secs();
        assert_eq!(res.status(), StatusCode::TOO_MANY_REQUESTS, "{cal:?}");
        let retry: i64 = field(&res, "retry-after").parse().unwrap();
        assert_boundary(retry, before, after, cal, offset, "fallback Retry-After");
    }
}

/// The quota handle reads a calendar rule without consuming (its reset at the boundary), and
/// a reset gives the period's quota back.
async fn the_handle_reads_and_resets_a_calendar_quota(env: Env) {
    let inner = service_fn(|_req: Req| async {
        Ok::<_, Infallible>(Response::new(Full::<Bytes>::from("ok")))
    });
    let (cal, offset) = (Calendar::Week, 330);
    let layer = RateLimitLayer::new(
        env.store().await,
        Policy::new("weekly", rule(3, cal, offset)),
    )
    .scope("handle");
    let handle = layer.handle();
    let svc = ServiceBuilder::new().layer(layer).service(inner);
    for _ in 0..2 {
        let res = svc.clone().oneshot(request()).await.unwrap();
        assert_eq!(res.status(), StatusCode::OK);
    }
    let key = handle.key_of(&request()).expect("a key");
    for _ in 0..3 {
        let before = now_secs();
        let quota = handle.quota("weekly", &key).await.expect("quota");
        let after = now_secs();
        assert_eq!((quota.rules[0].quota, quota.rules[0].remaining), (3, 1));
        let reset = quota.rules[0].reset.as_secs_f64().ceil() as i64;
        assert_boundary(reset, before, after, cal, offset, "handle reset");
    }
    handle.reset("weekly", &key).await.expect("reset");
    let quota = handle.quota("weekly", &key).await.expect("quota");
    assert_eq!(quota.rules[0].remaining, 3);
}

stores!(
    the_handle_reads_and_resets_a_calendar_quota,
    headers_point_at_the_next_boundary,
    metered_costs_settle_on_the_period
);
