// The status page in a real browser (Debian's Chromium, headless, through playwright-core), run by
// `cargo xtask browser`, which starts the workers and the page and scales the cluster when this
// script asks for it on stdout ("SCALE n"; it answers on stdin once done).
//
// Checks: the slot map has one cell per slot and its owners agree with `orchestrator status
// --json`; after scaling, the open page redraws by itself to the new picture; a worker's metrics
// address serves the same page; moving slots, a stopped projection and dead letters are drawn
// (from a doctored status.json: a live cluster shows them only for moments, or not yet); nothing
// is fetched from another origin; no script error. Screenshots go to $SHOTS.

import { execFileSync } from "node:child_process";
import { mkdirSync } from "node:fs";
import readline from "node:readline";
import { chromium } from "playwright-core";

const { PAGE_URL, WORKER_PAGE_URL, ORCHESTRATOR, STATUS_CWD, CHROMIUM, SHOTS } = process.env;
const stdin = readline.createInterface({ input: process.stdin })[Symbol.asyncIterator]();

const log = (message) => console.log(`    browser: ${message}`);
const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));

function fail(message) {
  throw new Error(message);
}

// The replica set as `orchestrator status --json` prints it.
function status() {
  const out = execFileSync(ORCHESTRATOR, ["status", "--json"], { cwd: STATUS_CWD, encoding: "utf8" });
  return JSON.parse(out)[0];
}

// What the page shows: its generation, members and slot cells.
async function shown(page) {
  return page.evaluate(() => {
    const set = document.querySelector(".replica-set");
    return {
      generation: set ? Number(set.dataset.generation) : null,
      members: [...document.querySelectorAll("tr.worker")].map((row) => row.dataset.worker),
      cells: [...document.querySelectorAll(".slots .slot")].map((cell) => ({
        slot: Number(cell.dataset.slot),
        owner: cell.dataset.owner,
        next: cell.dataset.nextOwner,
      })),
    };
  });
}

// Why the page and `status --json` disagree (null when they agree), for a settled replica set of
// `members` workers.
function disagreement(view, json, members) {
  const settled = json.workers.length === members &&
    json.workers.every((w) => w.state === "member") &&
    json.slot_map.every((s) => s.owner !== null && s.next_owner === null);
  if (!settled) return `status --json is not settled on ${members} members yet`;
  if (view.cells.length !== json.slots) return `${view.cells.length} cells for ${json.slots} slots`;
  if (view.generation !== json.generation) {
    return `the page shows generation ${view.generation}, status --json ${json.generation}`;
  }
  const owner = new Map();
  for (const worker of json.workers) for (const slot of worker.slots) owner.set(slot, worker.id);
  for (const cell of view.cells) {
    if (cell.owner !== owner.get(cell.slot)) {
      return `slot ${cell.slot}: the page says ${cell.owner || "nobody"}, status --json ${owner.get(cell.slot)}`;
    }
    if (cell.next) return `slot ${cell.slot} is shown moving to ${cell.next}`;
  }
  const ids = json.workers.map((w) => w.id).sort().join(",");
  if ([...view.members].sort().join(",") !== ids) return `members ${view.members} vs ${ids}`;
  return null;
}

// Polls until the page (redrawing by itself) and `status --json` agree.
async function agreeing(page, members, within = 45000) {
  const deadline = Date.now() + within;
  let why = "";
  while (Date.now() < deadline) {
    const json = status();
    const view = await shown(page);
    why = disagreement(view, json, members);
    if (why === null) return { json, view };
    await sleep(500);
  }
  fail(`the page never agreed with status --json on ${members} workers: ${why}`);
}

async function main() {
  mkdirSync(SHOTS, { recursive: true });
  const browser = await chromium.launch({ executablePath: CHROMIUM, args: ["--no-sandbox"] });
  const page = await browser.newPage({ viewport: { width: 1360, height: 900 } });
  const origin = new URL(PAGE_URL).origin;
  const foreign = [];
  const errors = [];
  page.on("request", (request) => {
    if (!request.url().startsWith(origin)) foreign.push(request.url());
  });
  page.on("pageerror", (error) => errors.push(error.message));
  try {
    await page.goto(PAGE_URL);
    await page.waitForSelector(".slots .slot", { timeout: 20000 });
    const three = await agreeing(page, 3);
    const owners = new Set(three.view.cells.map((c) => c.owner));
    log(`3 workers: ${three.view.cells.length} cells for ${three.json.slots} slots, coloured by ` +
        `${owners.size} owners, all as status --json says (generation ${three.json.generation})`);
    const projections = await page.$$eval(".projection", (rows) => rows.map((r) => r.dataset.projection));
    if (projections.length === 0) fail("no projection is shown");
    const history = await page.$$eval(".generations tbody tr", (rows) => rows.length);
    if (history === 0) fail("no generation history is shown");
    log(`projections shown: ${projections.join(", ")}; ${history} generations of history`);
    await page.screenshot({ path: `${SHOTS}/status-page-3-workers.png`, fullPage: true });

    console.log("SCALE 2");
    const answer = await stdin.next();
    if (answer.done || answer.value.trim() !== "scaled") fail(`scaling failed: ${answer.value}`);
    // No reload: the open page must redraw by itself.
    const two = await agreeing(page, 2);
    if (two.json.generation <= three.json.generation) fail("the generation did not move on");
    const gone = three.json.workers.map((w) => w.id).filter((id) => !two.view.members.includes(id));
    if (two.view.cells.some((c) => gone.includes(c.owner))) fail(`cells still owned by ${gone}`);
    const moved = three.view.cells.filter((c, i) => c.owner !== two.view.cells[i].owner).length;
    log(`scaled to 2: the open page redrew to generation ${two.json.generation}, ` +
        `${moved} cells changed owner (${gone} left), owners agree with status --json`);
    await page.screenshot({ path: `${SHOTS}/status-page-2-workers.png`, fullPage: true });

    // The same page on a worker's metrics address.
    const worker = await browser.newPage({ viewport: { width: 1360, height: 900 } });
    worker.on("pageerror", (error) => errors.push(error.message));
    await worker.goto(WORKER_PAGE_URL);
    await worker.waitForSelector(".slots .slot", { timeout: 20000 });
    const onWorker = await agreeing(worker, 2);
    log(`${WORKER_PAGE_URL} serves the same page: ${onWorker.view.cells.length} cells, owners agree`);

    // Moving slots and the failure fields, drawn from the real picture with every 16th slot
    // handed to another worker, one projection stopped and dead letters on the other.
    await page.route("**/status.json", async (route) => {
      const response = await route.fetch();
      const body = await response.json();
      const rs = body[0];
      const ids = rs.workers.map((w) => w.id);
      rs.slot_map.forEach((s, i) => {
        if (i % 16 === 0) s.next_owner = ids.find((id) => id !== s.owner);
      });
      rs.projections[0].state = "stopped";
      rs.projections[0].stopped = { position: 1234, aggregate: "demo/Account/account-7",
                                    event_type: "Deposited", error: "handler failed: demo failure",
                                    age_ms: 42000 };
      rs.projections[rs.projections.length - 1].dead_letters = 3;
      await route.fulfill({ response, json: body });
    });
    const expected = Math.ceil(two.json.slots / 16);
    await page.waitForFunction((n) => document.querySelectorAll(".slots .slot.moving").length === n &&
      document.querySelector(".badge.stopped") !== null, expected, { timeout: 10000 });
    log(`doctored picture: ${expected} moving slots outlined, a stopped projection and dead letters drawn`);
    await page.screenshot({ path: `${SHOTS}/status-page-moving.png`, fullPage: true });
    await page.unroute("**/status.json");

    if (foreign.length) fail(`the page fetched from other origins: ${foreign.join(", ")}`);
    if (errors.length) fail(`script errors on the page: ${errors.join("; ")}`);
    log("ok");
  } catch (error) {
    await page.screenshot({ path: `${SHOTS}/status-page-failure.png`, fullPage: true }).catch(() => {});
    throw error;
  } finally {
    await browser.close();
  }
}

main().then(
  () => process.exit(0),
  (error) => {
    console.error(`    browser: FAILED: ${error.message}`);
    process.exit(1);
  },
);
