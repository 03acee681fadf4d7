#!/usr/bin/env node
// node-postgres through rolegate: the scenarios of tests/drivers.rs.
//
// Usage:
//   node scenarios.js --rw PORT --ro PORT SCENARIO [SCENARIO ...]   (or `all`)
//   node scenarios.js --rw PORT --ro PORT switchover
//
// Scenarios: simple_query extended_prepared transaction_rollback copy_10mb
// listen_notify result_50mb cancel goodbye. Each runs through both listeners (rw and
// ro; writes only through rw; LISTEN/NOTIFY on rw only).
//
// `switchover` opens a write session, prints `ready`, reads the new leader's
// PostgreSQL port from stdin (written once the switchover is done), then
// checks that the old session got an error and that a new rw session reaches
// the new leader.
//
// Prints one line per check: `ok <listener> <scenario> <detail>` or
// `FAIL <listener> <scenario> <error>`; exits 1 if any check failed.
'use strict'

const { Client, Query } = require('pg')
const { from: copyFrom, to: copyTo } = require('pg-copy-streams')
const { pipeline } = require('node:stream/promises')
const { Readable } = require('node:stream')
const readline = require('node:readline')

const COPY_ROWS = 100000
const BIG_ROWS = 51200
const BIG_WIDTH = 1024 // 50 MiB of text
const COPY_QUERY = `select i, repeat(chr(97 + i % 26), 100) from generate_series(1, ${COPY_ROWS}) as i`
const STEP_TIMEOUT_MS = 60000

let failed = false

function report (ok, listener, scenario, detail) {
  failed = failed || !ok
  const oneLine = String(detail).split('\n').map((l) => l.trim()).filter(Boolean).join(' | ')
  process.stdout.write(`${ok ? 'ok' : 'FAIL'} ${listener} ${scenario} ${oneLine}\n`)
}

function assert (condition, message) {
  if (!condition) throw new Error(message)
}

function copyBytes () {
  const parts = []
  for (let i = 1; i <= COPY_ROWS; i++) {
    parts.push(`${i}\t${String.fromCharCode(97 + (i % 26)).repeat(100)}\n`)
  }
  return Buffer.from(parts.join(''))
}

function withTimeout (promise, what) {
  let timer
  return Promise.race([
    promise,
    new Promise((resolve, reject) => {
      timer = setTimeout(() => reject(new Error(`${what}: no answer within ${STEP_TIMEOUT_MS} ms`)), STEP_TIMEOUT_MS)
    })
  ]).finally(() => clearTimeout(timer))
}

class Target {
  constructor (args, port, listener) {
    this.listener = listener
    this.writable = listener === 'rw'
    this.config = {
      host: args.host,
      port,
      user: args.user,
      password: args.password,
      database: args.dbname,
      application_name: 'drivers-node',
      connectionTimeoutMillis: 10000
    }
  }

  async connect () {
    const client = new Client(this.config)
    // An error on an idle client (e.g. rolegate's FATAL at a switchover) is
    // emitted as an event; without a listener node would crash.
    client.errors = []
    client.on('error', (e) => { client.errors.push(e) })
    await withTimeout(client.connect(), 'connect')
    return client
  }

  async with (fn) {
    const client = await this.connect()
    try {
      return await fn(client)
    } finally {
      await client.end().catch(() => {})
    }
  }
}

const scenarios = {
  // A query without parameters goes out as a simple Query message.
  simple_query: (t) => t.with(async (c) => {
    const results = await c.query('select 1 as one; select pg_is_in_recovery() as r, inet_server_port() as p')
    assert(Array.isArray(results) && results.length === 2, 'expected two results')
    assert(results[0].rows[0].one === 1, 'select 1')
    const { r, p } = results[1].rows[0]
    assert(r === !t.writable, `pg_is_in_recovery() = ${r}`)
    return `server port ${p} in_recovery=${r}`
  }),

  // A named query is prepared once (Parse) and then bound and executed.
  extended_prepared: (t) => t.with(async (c) => {
    for (let i = 1; i <= 3; i++) {
      const res = await c.query({
        name: 'drv_prepared',
        text: "select $1::int * 2 as d, $2::text || '!' as s, pg_is_in_recovery() as r",
        values: [i, `v${i}`]
      })
      const row = res.rows[0]
      assert(row.d === i * 2 && row.s === `v${i}!` && row.r === !t.writable, `bind ${i}: ${JSON.stringify(row)}`)
    }
    const n = (await c.query({ text: 'select count(*)::int as n from pg_prepared_statements where name = $1', values: ['drv_prepared'] })).rows[0].n
    assert(n === 1, `${n} prepared statements named drv_prepared`)
    return '3 binds of a named prepared statement'
  }),

  transaction_rollback: (t) => t.with(async (c) => {
    if (t.writable) {
      await c.query('create temp table drv_tx (v int)')
      await c.query('begin')
      await c.query('insert into drv_tx select generate_series(1, 3)')
      const inside = (await c.query('select count(*)::int as n from drv_tx')).rows[0].n
      assert(inside === 3, `${inside} rows inside the transaction`)
      await c.query('rollback')
      const after = (await c.query('select count(*)::int as n from drv_tx')).rows[0].n
      assert(after === 0, `${after} rows after rollback`)
      return '3 inserted rows rolled back'
    }
    await c.query('begin')
    await c.query("set local statement_timeout = '1234ms'")
    assert((await c.query('show statement_timeout')).rows[0].statement_timeout === '1234ms', 'SET LOCAL')
    await c.query('rollback')
    assert((await c.query('show statement_timeout')).rows[0].statement_timeout !== '1234ms', 'SET LOCAL survived the rollback')
    await c.query('begin')
    let code = null
    try {
      await c.query('create temp table drv_tx (v int)')
    } catch (e) {
      code = e.code
    }
    await c.query('rollback')
    assert(code === '25006', `write on the ro listener: ${code === null ? 'succeeded' : code}`)
    await c.query('select 1')
    return 'SET LOCAL rolled back; write refused with 25006, session usable'
  }),

  copy_10mb: (t) => t.with(async (c) => {
    const data = copyBytes()
    let source
    if (t.writable) {
      await c.query('create temp table drv_copy (i int, t text)')
      const chunks = []
      for (let start = 0; start < data.length; start += 65536) chunks.push(data.subarray(start, start + 65536))
      const sink = c.query(copyFrom('copy drv_copy from stdin'))
      await withTimeout(pipeline(Readable.from(chunks), sink), 'COPY FROM')
      assert(sink.rowCount === COPY_ROWS, `COPY FROM reported ${sink.rowCount} rows`)
      source = 'copy (select i, t from drv_copy order by i) to stdout'
    } else {
      source = `copy (${COPY_QUERY}) to stdout`
    }
    const out = []
    const stream = c.query(copyTo(source))
    await withTimeout((async () => { for await (const chunk of stream) out.push(chunk) })(), 'COPY TO')
    const got = Buffer.concat(out)
    assert(got.equals(data), `COPY TO returned ${got.length} bytes, differing from the ${data.length} expected`)
    return `${data.length} bytes ${t.writable ? 'in and back out' : 'out'}, identical`
  }),

  // Applications skip their own notifications by comparing the sender
  // with the pid from BackendKeyData (client.processID).
  notify_self: async (t) => {
    const c = await t.connect()
    const other = await t.connect()
    try {
      const seen = {}
      const both = new Promise((resolve, reject) => {
        const timer = setTimeout(() => reject(new Error(`notifications within 10 s: ${JSON.stringify(seen)}`)), 10000)
        c.on('notification', (n) => {
          seen[n.payload] = n.processId
          if ('mine' in seen && 'theirs' in seen) { clearTimeout(timer); resolve() }
        })
      })
      await c.query('listen drv_self')
      await c.query("select pg_notify('drv_self', 'mine')")
      await other.query("select pg_notify('drv_self', 'theirs')")
      await both
      assert(seen.mine === c.processID, `own notification from pid ${seen.mine}, BackendKeyData said ${c.processID}`)
      assert(seen.theirs !== c.processID, `another session's notification carries this session's pid ${c.processID}`)
      const real = (await c.query('select pg_backend_pid() as pid')).rows[0].pid
      assert(real !== c.processID, `BackendKeyData's pid ${c.processID} is the server's own: the fleet issued no key`)
      return `own notification carries pid ${c.processID} (BackendKeyData; pg_backend_pid() is ${real}), the other session's does not`
    } finally {
      await c.end().catch(() => {})
      await other.end().catch(() => {})
    }
  },

  listen_notify: async (t) => {
    const listener = await t.connect()
    const notifier = await t.connect()
    try {
      const received = new Promise((resolve, reject) => {
        const timer = setTimeout(() => reject(new Error('no notification within 10 s')), 10000)
        listener.on('notification', (n) => { clearTimeout(timer); resolve(n) })
      })
      await listener.query('listen drv_channel')
      const pid = (await notifier.query('select pg_backend_pid() as pid')).rows[0].pid
      await notifier.query("select pg_notify('drv_channel', 'from node-postgres')")
      const n = await received
      assert(n.channel === 'drv_channel' && n.payload === 'from node-postgres' && n.processId === pid, JSON.stringify(n))
      return `notification from pid ${pid} received`
    } finally {
      await listener.end().catch(() => {})
      await notifier.end().catch(() => {})
    }
  },

  result_50mb: (t) => t.with(async (c) => {
    const started = Date.now()
    const res = await withTimeout(c.query(`select i, repeat('x', ${BIG_WIDTH}) as x from generate_series(1, ${BIG_ROWS}) as i`), '50 MB query')
    let total = 0
    for (const row of res.rows) total += row.x.length
    assert(res.rows.length === BIG_ROWS && total === BIG_ROWS * BIG_WIDTH, `${res.rows.length} rows, ${total} bytes`)
    return `${res.rows.length} rows, ${total} bytes of text in ${((Date.now() - started) / 1000).toFixed(2)}s`
  }),

  // node-postgres sends a CancelRequest on a new connection with
  // `new Client(config).cancel(client, query)` (pg itself reads the
  // deprecated `activeQuery` there, hence a DeprecationWarning on stderr).
  cancel: (t) => t.with(async (c) => {
    const started = Date.now()
    const query = new Query('select pg_sleep(60)')
    const done = new Promise((resolve, reject) => {
      query.on('end', resolve)
      query.on('error', reject)
    })
    c.query(query)
    const timer = setTimeout(() => new Client(t.config).cancel(c, query), 1000)
    let code = null
    try {
      await withTimeout(done, 'pg_sleep(60)')
    } catch (e) {
      code = e.code || e.message
    } finally {
      clearTimeout(timer)
    }
    const took = (Date.now() - started) / 1000
    assert(code === '57014', `expected 57014, got ${code}`)
    assert(took < 15, `cancel took ${took}s`)
    await c.query('select 1')
    return `cancelled after ${took.toFixed(2)}s (57014), session still usable`
  }),

  // end() sends Terminate and closes the socket a moment later (after the
  // server has closed its side); connect() then end() at once closes
  // before the login. node-postgres raises an 'error' event for anything
  // the proxy sends meanwhile (a process without a listener exits).
  goodbye: async (t) => {
    const rounds = 20
    const seen = []
    for (let i = 0; i < rounds; i++) {
      const c = new Client(t.config)
      c.on('error', (e) => seen.push(`after end(): ${e.message}`))
      await withTimeout(c.connect(), 'connect')
      await c.query('select 1')
      await withTimeout(c.end(), 'end')
      const quick = new Client(t.config)
      quick.on('error', (e) => seen.push(`connect(); end(): ${e.message}`))
      // Its connect() promise never settles once end() came first.
      quick.connect().catch(() => {})
      await withTimeout(quick.end(), 'end at once')
    }
    await new Promise((resolve) => setTimeout(resolve, 300))
    assert(seen.length === 0, `${seen.length} error events: ${seen.slice(0, 3).join('; ')}`)
    return `${rounds} end() after a query and ${rounds} connect(); end() at once, no error event`
  }
}
const RW_ONLY = new Set(['listen_notify', 'notify_self'])

async function run (targets, names) {
  for (const name of names) {
    for (const t of targets) {
      if (RW_ONLY.has(name) && !t.writable) continue
      try {
        report(true, t.listener, name, await scenarios[name](t))
      } catch (e) {
        report(false, t.listener, name, `${e.name}: ${e.message}${e.code ? ` [${e.code}]` : ''}`)
      }
    }
  }
}

async function switchover (rw) {
  const old = await rw.connect()
  const before = (await old.query('select inet_server_port() as p')).rows[0].p
  process.stdout.write(`ready on port ${before}\n`)
  const lines = readline.createInterface({ input: process.stdin })
  const line = await new Promise((resolve) => {
    lines.once('line', resolve)
    lines.once('close', () => resolve(''))
  })
  lines.close()
  if (!line.trim()) {
    report(false, 'rw', 'switchover', 'no new leader port on stdin')
    return
  }
  const newPort = parseInt(line, 10)
  try {
    await withTimeout(old.query('select 1'), 'query on the old session')
    report(false, 'rw', 'switchover_old_session', 'the session on the old leader still answers')
  } catch (e) {
    const events = old.errors.map((x) => `${x.message}${x.code ? ` [${x.code}]` : ''}`)
    const seen = events.length ? ` (error events: ${events.join('; ')})` : ''
    report(true, 'rw', 'switchover_old_session', `error: ${e.message}${e.code ? ` [${e.code}]` : ''}${seen}`)
  } finally {
    await old.end().catch(() => {})
  }
  const deadline = Date.now() + 30000
  for (let attempt = 1; ; attempt++) {
    try {
      const detail = await rw.with(async (c) => {
        const { r, p } = (await c.query('select pg_is_in_recovery() as r, inet_server_port() as p')).rows[0]
        await c.query('create temp table drv_after (v int); insert into drv_after values (1)')
        assert(!r && p === newPort, `reached port ${p}, in_recovery=${r}; new leader on ${newPort}`)
        return `attempt ${attempt}: port ${p} writable`
      })
      report(true, 'rw', 'switchover_reconnect', detail)
      return
    } catch (e) {
      if (Date.now() > deadline) {
        report(false, 'rw', 'switchover_reconnect', `after ${attempt} attempts: ${e.message}`)
        return
      }
      await new Promise((resolve) => setTimeout(resolve, 200))
    }
  }
}

async function main () {
  const argv = process.argv.slice(2)
  const args = { host: '127.0.0.1', user: 'app', password: 'app', dbname: 'app' }
  const names = []
  for (let i = 0; i < argv.length; i++) {
    const m = /^--(host|rw|ro|user|password|dbname)$/.exec(argv[i])
    if (m) args[m[1]] = argv[++i]
    else names.push(argv[i])
  }
  if (!args.rw || !args.ro || names.length === 0) {
    process.stderr.write('usage: scenarios.js --rw PORT --ro PORT SCENARIO...|all|switchover\n')
    process.exit(2)
  }
  const rw = new Target(args, parseInt(args.rw, 10), 'rw')
  const ro = new Target(args, parseInt(args.ro, 10), 'ro')
  if (names.length === 1 && names[0] === 'switchover') {
    await switchover(rw)
  } else {
    const list = names.length === 1 && names[0] === 'all' ? Object.keys(scenarios) : names
    const unknown = list.filter((n) => !(n in scenarios))
    if (unknown.length) {
      process.stderr.write(`unknown scenario(s): ${unknown.join(', ')}\n`)
      process.exit(2)
    }
    await run([rw, ro], list)
  }
  process.exit(failed ? 1 : 0)
}

main().catch((e) => {
  process.stdout.write(`FAIL - script ${e.stack}\n`)
  process.exit(1)
})
