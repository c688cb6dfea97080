/**
 * Example partner program: follow the appointment change feed, resuming by itself across server restarts.
 *
 * Environment:
 *   APPTGATE_PARTNER_ADDR    the partner listener (default localhost:50051, what `make run` serves)
 *   APPTGATE_PARTNER_KEY     the partner key (required)
 *   APPTGATE_PRACTITIONER_ID one practitioner (default: every granted one)
 *   APPTGATE_RESUME_TOKEN    a token printed earlier, to continue after it (default: from now)
 *   APPTGATE_MAX_CHANGES     stop after this many changes (default: never)
 *   APPTGATE_RESUME_TIMEOUT_MS  how long to keep trying to get the stream back before giving up
 *                            (default: the client's, 60 s)
 *
 * Prints one JSON document per line: {"event": "live"} once the stream is live, then
 * {"event": "change", "changeType": ..., "appointmentId": ..., "startTime": ..., "resumeToken": ...} per change.
 * Each reopening of the stream is logged on stderr. SIGINT or SIGTERM stops it, printing
 * {"event": "stopped", "resumeToken": ...}: the token of the last change or bookmark received (the
 * server's bookmarks are not printed, but keep the token current while the feed is quiet).
 * Exit status: 0 stopped, 1 the feed failed (for example a revoked key), 2 bad usage.
 */

import { timestampDate } from "@bufbuild/protobuf/wkt";

import { ApptgateError, ChangeType, PartnerClient } from "../src/index.js";

function print(document: unknown): void {
  console.log(JSON.stringify(document));
}

async function main(): Promise<number> {
  const key = process.env.APPTGATE_PARTNER_KEY ?? "";
  const maxChanges = Number(process.env.APPTGATE_MAX_CHANGES || Infinity);
  const resumeTimeout = process.env.APPTGATE_RESUME_TIMEOUT_MS;
  const resumeTimeoutMs = resumeTimeout ? Number(resumeTimeout) : undefined;
  if (!key || Number.isNaN(maxChanges) || !(resumeTimeoutMs === undefined || resumeTimeoutMs >= 0)) {
    console.error(
      "watch-agenda: set APPTGATE_PARTNER_KEY to your partner key " +
        "(APPTGATE_MAX_CHANGES and APPTGATE_RESUME_TIMEOUT_MS numbers)",
    );
    return 2;
  }
  const client = new PartnerClient({
    address: process.env.APPTGATE_PARTNER_ADDR || "localhost:50051",
    key,
    onRetry: ({ method, error, delayMs }) =>
      console.error(`watch-agenda: ${method}: ${error.codeName}; reopening in ${Math.round(delayMs)} ms`),
  });
  const watch = client.watchAppointments({
    practitionerId: process.env.APPTGATE_PRACTITIONER_ID ?? "",
    resumeToken: process.env.APPTGATE_RESUME_TOKEN ?? "",
    resumeTimeoutMs,
  });
  const stop = () => watch.close();
  process.once("SIGINT", stop).once("SIGTERM", stop);
  try {
    await watch.open();
    print({ event: "live" });
    let seen = 0;
    for await (const change of watch) {
      print({
        event: "change",
        changeType: ChangeType[change.changeType],
        appointmentId: change.appointment?.appointmentId,
        startTime: change.appointment?.startTime ? timestampDate(change.appointment.startTime).toISOString() : null,
        resumeToken: change.resumeToken,
      });
      if (++seen >= maxChanges) break;
    }
    print({ event: "stopped", resumeToken: watch.resumeToken });
    return 0;
  } catch (error) {
    if (!(error instanceof ApptgateError)) throw error;
    console.error(`watch-agenda: ${error.codeName}: ${error.message} (reason ${error.reason || "none"})`);
    return 1;
  } finally {
    process.off("SIGINT", stop).off("SIGTERM", stop);
    watch.close();
    client.close();
  }
}

process.exitCode = await main();
