/**
 * Example partner program: ask a patient for contact details, wait for the answer on the consent-request
 * feed, then read what the patient released.
 *
 * Environment:
 *   APPTGATE_PARTNER_ADDR    the partner listener (default localhost:50051, what `make run` serves)
 *   APPTGATE_PARTNER_KEY     the partner key (required)
 *   APPTGATE_APPOINTMENT_ID  the appointment whose patient is asked (required)
 *   APPTGATE_FIELDS          the contact fields asked for, comma-separated (default NAME,EMAIL)
 *   APPTGATE_PURPOSE         why, shown to the patient (default "appointment reminders")
 *   APPTGATE_MESSAGE         a message to the patient (default none)
 *   APPTGATE_TTL_SECONDS     how long the consent should last (default 30 days)
 *
 * Prints one JSON document per line as things happen:
 *   {"event": "requested", "consentRequestId": ..., "state": ..., "alreadyPending": bool}  once asked;
 *   {"event": "changed", "consentRequestId": ..., "state": ...}  once that request is no longer pending;
 *   {"event": "contact", "contact": {...}}  once approved, with the released details.
 * Exit status: 0 approved and read, 3 the request was denied, expired or cancelled, 1 any other failure,
 * 2 bad usage.
 */

import { toJson } from "@bufbuild/protobuf";

import {
  AppointmentContactSchema,
  ApptgateError,
  ConsentRequestPending,
  ConsentRequestState,
  ContactField,
  PartnerClient,
  type ConsentRequest,
} from "../src/index.js";

function print(document: unknown): void {
  console.log(JSON.stringify(document));
}

function describe(event: string, request: ConsentRequest, extra: object = {}): object {
  return { event, consentRequestId: request.consentRequestId, state: ConsentRequestState[request.state], ...extra };
}

function fields(text: string): ContactField[] {
  return text.split(",").map((name) => {
    const field = ContactField[name.trim().toUpperCase() as keyof typeof ContactField];
    if (field === undefined || field === ContactField.UNSPECIFIED) {
      throw new RangeError(`unknown contact field ${name}`);
    }
    return field;
  });
}

async function main(): Promise<number> {
  const key = process.env.APPTGATE_PARTNER_KEY ?? "";
  const appointmentId = process.env.APPTGATE_APPOINTMENT_ID ?? "";
  let asked: ContactField[];
  try {
    asked = fields(process.env.APPTGATE_FIELDS || "NAME,EMAIL");
  } catch (error) {
    console.error(`request-contact: ${(error as Error).message}`);
    return 2;
  }
  const ttlSeconds = Number(process.env.APPTGATE_TTL_SECONDS || 30 * 24 * 3600);
  if (!key || !appointmentId || !Number.isFinite(ttlSeconds)) {
    console.error("request-contact: set APPTGATE_PARTNER_KEY and APPTGATE_APPOINTMENT_ID (and a numeric TTL)");
    return 2;
  }
  const client = new PartnerClient({
    address: process.env.APPTGATE_PARTNER_ADDR || "localhost:50051",
    key,
    onRetry: ({ method, error, delayMs }) =>
      console.error(`request-contact: ${method}: ${error.codeName}; again in ${Math.round(delayMs)} ms`),
  });
  // Watch first, then ask: the answer cannot slip between the two.
  const watch = client.watchConsentRequests();
  try {
    await watch.open();
    let request: ConsentRequest;
    try {
      request = await client.requestContactAccess(
        appointmentId,
        asked,
        process.env.APPTGATE_PURPOSE || "appointment reminders",
        ttlSeconds * 1000,
        process.env.APPTGATE_MESSAGE ?? "",
      );
      print(describe("requested", request, { alreadyPending: false }));
    } catch (error) {
      if (!(error instanceof ConsentRequestPending)) throw error;
      request = await client.getConsentRequest(error.consentRequestId); // asked before: follow that one
      print(describe("requested", request, { alreadyPending: true }));
    }
    while (request.state === ConsentRequestState.PENDING) {
      const next = await watch.next();
      if (next.done) throw new Error("the consent-request feed ended");
      const changed = next.value.consentRequest;
      // Only this request's answer (or lapse) matters here: its creation (PENDING) and other requests are skipped.
      if (changed?.consentRequestId !== request.consentRequestId || changed.state === ConsentRequestState.PENDING) {
        continue;
      }
      request = changed;
      print(describe("changed", request));
    }
    if (request.state !== ConsentRequestState.APPROVED) return 3;
    const contact = await client.getAppointmentContact(appointmentId, request.consentToken);
    print({ event: "contact", contact: toJson(AppointmentContactSchema, contact) });
    return 0;
  } catch (error) {
    if (!(error instanceof ApptgateError)) throw error;
    console.error(`request-contact: ${error.codeName}: ${error.message} (reason ${error.reason || "none"})`);
    return 1;
  } finally {
    watch.close();
    client.close();
  }
}

process.exitCode = await main();
