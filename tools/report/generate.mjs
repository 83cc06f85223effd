// `allure generate`, plus the run's quality-gate results in the report's own quality-gate tab: the CLI fills
// that tab only in `allure run`, and labs evaluates its gates itself (labs/reporting/gates.py).
// usage: node generate.mjs <dir with allurerc.mjs> <quality-gate.json or ""> <results dir>...
import { readFile } from "node:fs/promises";
import { AllureReport, readConfig } from "@allurereport/core";

const [cwd, gatesFile, ...resultsDirs] = process.argv.slice(2);
const report = new AllureReport(await readConfig(cwd));
await report.start();
for (const dir of resultsDirs) {
  await report.readDirectory(dir);
}
if (gatesFile) {
  report.realtimeDispatcher.sendQualityGateResults(JSON.parse(await readFile(gatesFile, "utf8")));
}
await report.done();
